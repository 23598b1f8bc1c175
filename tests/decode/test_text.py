"""Text: a local tokenizer (tokenizers .json file or Hugging Face folder) as the decoder."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
sys.path.insert(0, str(Path(__file__).parent.parent))  # examples.text_job's tokenizer maker

from examples.text_job import make_tokenizer  # noqa: E402
from sage_stream.decode.decoder import make_decoder  # noqa: E402
from sage_stream.errors import InputError, SampleError  # noqa: E402
from sage_stream.sample import Sample  # noqa: E402


def sample(**fields) -> Sample:
    return Sample("k", "s.parquet", fields)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_text_becomes_ids_and_mask_with_special_tokens(tokenizer):
    decoder = make_decoder(tokenizer=tokenizer, label_key="label")
    x, y = decoder(sample(text="we saw a train", label=1))
    assert set(x) == {"input_ids", "attention_mask"} and y == 1
    ids = x["input_ids"].tolist()
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) == 6  # [CLS] we saw a train [SEP]
    assert x["attention_mask"].tolist() == [1] * 6
    short, _ = make_decoder(tokenizer=tokenizer, max_length=3, label_key="label")(
        sample(text="we saw a train", label=1)
    )
    assert len(short["input_ids"]) == 3


def test_a_tokenizer_folder_gives_the_same_ids(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer)
    fast.save_pretrained(str(tmp_path / "folder"))
    a = make_decoder(tokenizer=tokenizer, label_key=None)(sample(text="rain and snow"))[0]
    b = make_decoder(tokenizer=str(tmp_path / "folder"), label_key=None)(
        sample(text="rain and snow")
    )[0]
    assert a["input_ids"].tolist() == b["input_ids"].tolist()


def test_tar_text_members_and_other_fields(tokenizer):
    decoder = make_decoder(tokenizer=tokenizer, input_key="txt", label_key="cls")
    x, y = decoder(sample(txt=b"the bus", cls=b"2"))
    assert len(x["input_ids"]) == 4 and y == 2
    with pytest.raises(SampleError, match="missing text field 'txt'"):
        decoder(sample(body=b"x", cls=b"1"))
    with pytest.raises(SampleError, match="not UTF-8"):
        decoder(sample(txt=b"\xff\xfe", cls=b"1"))


def test_a_bad_tokenizer_path_fails_at_once(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        make_decoder(tokenizer=str(tmp_path / "nothing"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="not a tokenizers file"):
        make_decoder(tokenizer=str(bad))


def test_the_text_decoder_pickles_for_loader_workers(tokenizer):
    decoder = make_decoder(tokenizer=tokenizer, label_key=None)
    again = pickle.loads(pickle.dumps(decoder))
    a, b = decoder(sample(text="a fig")), again(sample(text="a fig"))
    assert a[0]["input_ids"].tolist() == b[0]["input_ids"].tolist()


def test_the_feed_decodes_a_text_run_the_same_way(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    from examples import text_job
    from sage_stream.feed import SelectedDataset

    assert text_job.main([str(tmp_path), "--no-progress", "--ell", "8", "--device", "cpu"]) == 0
    x, label, score = next(iter(SelectedDataset(str(tmp_path / "out"))))
    assert x["input_ids"].dtype.is_floating_point is False and label in (0, 1, 2)
