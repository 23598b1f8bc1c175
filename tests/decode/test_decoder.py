"""Built-in decoders, the preprocess hook, and every way a sample can fail to decode."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from shardmaker import image_bytes, npy_bytes, png_bytes

from sage_stream.decode.decoder import (
    decode_image,
    decode_label,
    decode_npy,
    load_callable,
    make_decoder,
)
from sage_stream.errors import InputError, SampleError
from sage_stream.sample import Sample

UNPICKLED: list[str] = []


def _record_unpickle() -> str:
    UNPICKLED.append("unpickled")
    return "payload"


class Payload:
    """Unpickling this would run code; the decoders must never get that far."""

    def __reduce__(self):
        return (_record_unpickle, ())


def sample(**fields) -> Sample:
    return Sample(key="k1", shard="a.tar", fields=fields)


RGB = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # (H, W, C)


def test_decode_npy_round_trip():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(decode_npy(npy_bytes(array)), array)


def test_pickled_npy_is_refused_and_never_unpickled():
    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buf.getvalue())
    with pytest.raises(SampleError, match="cannot decode 'npy'") as info:
        make_decoder()(sample(npy=buf.getvalue(), cls=b"1"))
    assert (info.value.shard, info.value.key) == ("a.tar", "k1")
    assert UNPICKLED == []


def test_npz_is_refused():
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(2))
    with pytest.raises(ValueError, match="single .npy"):
        decode_npy(buf.getvalue())


def test_decode_image_rgb_png_is_exact_chw():
    x = decode_image(png_bytes(RGB))
    assert x.dtype == torch.float32 and x.shape == (3, 2, 3)
    torch.testing.assert_close(x, torch.from_numpy(RGB).permute(2, 0, 1).float() / 255)


def test_decode_image_grayscale_has_one_channel():
    gray = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    x = decode_image(png_bytes(gray))
    assert x.shape == (1, 2, 2)
    assert x[0, 0, 1] == 1.0 and x[0, 0, 0] == 0.0


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_other_modes_become_rgb(mode):
    buf = io.BytesIO()
    Image.fromarray(RGB).convert(mode).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (3, 2, 3)


@pytest.mark.parametrize(("fmt", "field"), [("JPEG", "jpg"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_decoder_reads_jpeg_and_webp(fmt, field):
    flat = np.full((8, 8, 3), 100, dtype=np.uint8)
    x, y = make_decoder()(sample(**{field: image_bytes(flat, fmt), "cls": b"2"}))
    assert x.shape == (3, 8, 8) and y == 2
    assert torch.allclose(x, torch.full_like(x, 100 / 255), atol=3 / 255)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"3", 3), (b" 7\n", 7), ("12", 12), (5, 5), (np.int64(2), 2), (4.0, 4), (b"-1", -1)],
)
def test_decode_label(value, expected):
    assert decode_label(value) == expected


@pytest.mark.parametrize("value", [b"cat", b"1.5", b"", 2.5, True, None, [1]])
def test_decode_label_rejects_non_integers(value):
    with pytest.raises(ValueError):
        decode_label(value)


def test_tar_npy_with_cls():
    x, y = make_decoder()(sample(npy=npy_bytes(np.ones((2, 2), np.float64)), cls=b"1\n"))
    assert x.dtype == torch.float32 and x.shape == (2, 2) and y == 1


def test_png_with_txt_label_and_explicit_input_key():
    decode = make_decoder(input_key="seg.png", label_key="txt")
    x, y = decode(sample(**{"seg.png": png_bytes(RGB), "png": png_bytes(RGB), "txt": b"4"}))
    assert x.shape == (3, 2, 3) and y == 4


def test_parquet_list_column_and_int_label():
    x, y = make_decoder()(Sample("k", "a.parquet", {"x": [[1, 2], [3, 4]], "cls": 2, "id": "z"}))
    assert x.dtype == torch.float32 and x.shape == (2, 2) and y == 2
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_parquet_bytes_column_is_sniffed():
    decode = make_decoder(input_key="data", label_key="label")
    x, _ = decode(Sample("k", "a.parquet", {"data": npy_bytes(np.zeros(3)), "label": 0}))
    assert x.shape == (3,)
    x, _ = decode(Sample("k", "a.parquet", {"data": png_bytes(RGB), "label": 0}))
    assert x.shape == (3, 2, 3)


def test_input_key_is_case_insensitive_for_tar_fields_and_unlabeled_is_zero():
    x, y = make_decoder(input_key="NPY", label_key=None)(sample(npy=npy_bytes(np.zeros(2))))
    assert x.shape == (2,) and y == 0


@pytest.mark.parametrize(
    ("fields", "kwargs", "message"),
    [
        (
            {"cls": b"1", "json": b"{}"},
            {},
            r"no input member: fields are \['cls', 'json'\]; pass --input-key",
        ),
        ({"png": b"", "npy": b"", "cls": b"1"}, {}, "ambiguous input"),
        ({"png": b"", "cls": b"1"}, {"input_key": "jpg"}, "missing input field 'jpg'"),
        ({"npy": npy_bytes(np.zeros(2))}, {}, "missing label field 'cls'"),
        ({"png": b"not an image", "cls": b"1"}, {}, "cannot decode 'png'"),
        ({"npy": npy_bytes(np.zeros(2)), "cls": b"dog"}, {}, "bad label in 'cls'"),
        ({"x": [[1, 2], [3]], "cls": 1}, {}, "cannot decode 'x'"),
        ({"x": [1, None], "cls": 1}, {}, "cannot decode 'x'"),
        ({"x": [1.0], "cls": None}, {}, "missing label field 'cls'"),
    ],
)
def test_decode_errors_name_shard_key_and_reason(fields, kwargs, message):
    with pytest.raises(SampleError, match=message) as info:
        make_decoder(**kwargs)(sample(**fields))
    assert "'a.tar'" in str(info.value) and "'k1'" in str(info.value)


def _user_preprocess(s: Sample):
    if s.key == "bad":
        raise RuntimeError("cannot handle this one")
    if s.key == "odd":
        return "only one thing"
    return np.ones(3), s.fields["y"]


def test_preprocess_callable_and_its_failures():
    decode = make_decoder(preprocess=_user_preprocess)
    x, y = decode(Sample("ok", "s", {"y": b"3"}))
    assert torch.equal(x, torch.ones(3, dtype=torch.float64)) and y == 3
    with pytest.raises(
        SampleError, match="preprocess failed: RuntimeError: cannot handle this one"
    ):
        decode(Sample("bad", "s", {}))
    with pytest.raises(SampleError, match=r"must return \(input, label\)"):
        decode(Sample("odd", "s", {}))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A ``prep_<n>.py`` in a fresh working directory; sys.path restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    name = f"prep_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def run(sample):\n"
        "    return torch.zeros(2), int(sample.fields['cls'])\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def run(sample):\n"
        "        return torch.ones(1), 7\n"
        "VALUE = 3\n"
    )
    yield name
    sys.modules.pop(name, None)


def test_preprocess_spec_is_loaded_from_the_working_directory(user_module):
    x, y = make_decoder(preprocess=f"{user_module}:run")(sample(cls=b"5"))
    assert x.shape == (2,) and y == 5
    assert load_callable(f"{user_module}:Holder.run")(None) == (torch.ones(1), 7)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected MODULE:FUNCTION"),
        (":run", "expected MODULE:FUNCTION"),
        ("{mod}:", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:run", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:VALUE", "is not callable"),
    ],
)
def test_load_callable_errors(user_module, spec, message):
    with pytest.raises(InputError, match=message):
        load_callable(spec.format(mod=user_module))


@pytest.mark.parametrize("text", ["0_3", "٣", "３", "3.0", "1e1", "+ 3", "\u20073"])
def test_labels_are_ascii_digits_only(text):
    """int() takes "0_3", Arabic-Indic and full-width digits as numbers: a label must not."""
    with pytest.raises(ValueError, match="not an integer label"):
        decode_label(text.encode())
    with pytest.raises(ValueError, match="not an integer label"):
        decode_label(text)


@pytest.mark.parametrize(("text", "label"), [("3", 3), (" 12\n", 12), ("-1", -1), ("007", 7)])
def test_plain_labels_still_read(text, label):
    assert decode_label(text.encode()) == label


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(monkeypatch):
    """Issue 15, case 6: a small PNG of many pixels is refused before it is decoded."""
    import io

    from PIL import Image

    from sage_stream.decode import decoder as decode

    buf = io.BytesIO()
    Image.new("L", (300, 200)).save(buf, format="PNG")
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 300 * 200 - 1)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ValueError, match="300x200 = 60000 pixels, over the limit"):
        decode.decode_image(buf.getvalue())
    assert decoded == []  # never decoded
    monkeypatch.undo()
    assert decode.decode_image(buf.getvalue()).shape == (1, 200, 300)
