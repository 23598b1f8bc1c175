"""The loader: decode in worker processes, outputs byte-identical for any number of them."""

from __future__ import annotations

import io
import os
import signal
import tarfile
from pathlib import Path

import pytest
import torch
from paths import HELPERS
from runs import output_files
from shardmaker import write_bytes
from tiny import blobs, train_checkpoint, write_parquet_set, write_tar_set

import sage_stream
from sage_stream.decode.decoder import make_decoder
from sage_stream.errors import InputError, LoaderError
from sage_stream.inputs import expand_inputs
from sage_stream.passes.loader import ReadSpec, decoded_shards, default_workers

OPTIONS = dict(model="tiny:mlp", ell=16, batch_size=16, device="cpu", keep=0.5, progress=False,
               preprocess="slow:decode")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    x, _, noisy = blobs(200)
    tar = write_tar_set(root / "tar", x, noisy, shards=5)
    cut = Path(tar[3]).read_bytes()  # shard 3 breaks part-way: a recorded shard failure
    with tarfile.open(fileobj=io.BytesIO(cut)) as tf:
        half = tf.getmembers()[len(tf.getmembers()) // 2].offset_data + 5
    Path(tar[3]).write_bytes(cut[:half])
    return {
        "tar": tar,
        "parquet": write_parquet_set(root / "pq", x, noisy, shards=4),
        "ckpt": train_checkpoint(root / "proxy.pt", x, noisy),
    }


@pytest.fixture(autouse=True)
def helpers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    monkeypatch.setenv("PYTHONPATH", str(HELPERS))  # for the spawned workers


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_outputs_are_byte_identical_for_0_1_2_workers(data, tmp_path, fmt):
    extra = {"label_key": "label", "preprocess": None} if fmt == "parquet" else {}
    outs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        result = sage_stream.run(data[fmt], out=str(out), checkpoint=data["ckpt"],
                                 loader_workers=workers, **{**OPTIONS, **extra})  # fmt: skip
        outs.append(output_files(out))
        assert result.emit.totals["seen"] > 0
    assert outs[0] == outs[1] == outs[2]
    if fmt == "tar":  # the slow shard, the failing keys and the broken shard all recorded
        errors = (tmp_path / "w2" / "manifest.json").read_text()
        assert "part-003.tar" in errors and "truncated" in errors
        assert result.emit.totals["errored"] > 0


def test_a_worker_that_dies_is_an_error_naming_the_shard_not_a_hang(data, tmp_path, monkeypatch):
    counter = tmp_path / "count"
    monkeypatch.setenv("SAGE_TEST_KILL_COUNTER", str(counter))
    monkeypatch.setenv("SAGE_TEST_KILL_AT", "50")  # in the second shard
    options = {**OPTIONS, "preprocess": "killer:decode", "loader_workers": 1}
    died = rf"died with exit code {-signal.SIGKILL} \(the pass was at .*part-00[01]\.tar"
    with pytest.raises(LoaderError, match=died):
        sage_stream.sketch(data["tar"], out=str(tmp_path / "o"), checkpoint=data["ckpt"],
                           **{k: v for k, v in options.items() if k != "keep"})  # fmt: skip
    assert int(counter.read_text()) == 50  # it died where it was told to, in the worker


def test_a_decoder_that_cannot_be_pickled_is_refused_with_the_way_out(data, tmp_path):
    with pytest.raises(InputError, match="cannot be pickled.*--loader-workers 0"):
        sage_stream.sketch(data["tar"], out=str(tmp_path / "o"), checkpoint=data["ckpt"],
                           model="tiny:mlp", ell=16, device="cpu", progress=False,
                           preprocess=lambda s: (s, 0), loader_workers=1)  # fmt: skip


def test_memory_urls_decode_in_process(data, mem_url):
    write_bytes(f"{mem_url}/a.tar", Path(data["tar"][0]).read_bytes())
    with pytest.raises(InputError, match="memory:// is private"):
        sage_stream.sketch([f"{mem_url}/a.tar"], out=f"{mem_url}/o", model="tiny:mlp",
                           device="cpu", loader_workers=2, progress=False)  # fmt: skip


def test_shards_come_back_in_order_with_their_items(data):
    spec = ReadSpec(make_decoder(), {}, {"tar": {}, "parquet": {}}, 16, 3)
    refs = expand_inputs(data["tar"][:3])
    seen = {}
    for workers in (0, 2):
        got = []
        for ref, items in decoded_shards(spec, refs, workers):
            got.append((ref.name, [k for item in items for k in getattr(item, "keys", [])]))
        seen[workers] = got
    assert seen[0] == seen[2] and [name for name, _ in seen[2]] == [r.name for r in refs]


def test_default_workers_leave_the_model_its_cores():
    assert default_workers(torch.device("cpu")) == 0  # measured: no gain on a CPU node
    cores = len(os.sched_getaffinity(0))
    assert default_workers(torch.device("cuda")) == min(8, cores - 1)
