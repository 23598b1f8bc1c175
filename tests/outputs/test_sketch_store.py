"""sketch.zarr: round trip, refusal of incomplete stores and of stores from another run."""

from __future__ import annotations

import pytest
import torch
import zarr

from sage_stream.errors import InputError, MismatchError
from sage_stream.outputs.sketch_store import SketchStore

IDENTITY = {"model": "abc", "grad": "last-layer", "ell": 4, "dim": 6, "classes": 2}


def write(url: str) -> dict:
    torch.manual_seed(0)
    arrays = {
        "sigma": torch.tensor([3.0, 2.0, 1.0, 0.0]),
        "basis": torch.linalg.qr(torch.randn(6, 4)).Q.T.contiguous(),
        "consensus": torch.randn(2, 4),
        "class_counts": torch.tensor([5, 7]),
    }
    SketchStore(url).write(identity=IDENTITY, stats={"n": 12}, **arrays)
    return arrays


@pytest.mark.parametrize("where", ["memory", "local"])
def test_round_trip(where, mem_url, tmp_path):
    url = f"{mem_url}/sketch.zarr" if where == "memory" else str(tmp_path / "sketch.zarr")
    arrays = write(url)
    stored = SketchStore(url).read(expected=IDENTITY)
    for name in ("sigma", "basis", "consensus", "class_counts"):
        assert torch.equal(getattr(stored, name), arrays[name])
    assert stored.stats == {"n": 12} and stored.identity == IDENTITY


def test_identity_mismatch_names_what_differs(tmp_path):
    url = str(tmp_path / "sketch.zarr")
    write(url)
    with pytest.raises(MismatchError, match=r"ell: stored 4, now 8.*model: stored 'abc'"):
        SketchStore(url).read(expected={**IDENTITY, "ell": 8, "model": "xyz"})


def test_incomplete_or_missing_sketch_is_refused(tmp_path):
    url = str(tmp_path / "sketch.zarr")
    with pytest.raises(InputError, match="no sketch"):
        SketchStore(url).read()
    write(url)
    zarr.open_group(url, mode="a").attrs["status"] = "in-progress"
    with pytest.raises(InputError, match="not complete"):
        SketchStore(url).read()


def test_projections_are_float16_per_shard(tmp_path):
    url = str(tmp_path / "sketch.zarr")
    write(url)
    z = torch.randn(5, 4)
    SketchStore(url).write_projections("shard-0.tar", z)
    back = SketchStore(url).read_projections("shard-0.tar")
    assert back.dtype == torch.float16 and torch.equal(back, z.half())


def test_singular_values_only_of_a_complete_sketch(tmp_path):
    store = SketchStore(str(tmp_path / "sketch.zarr"))
    assert store.singular_values() is None  # absent
    arrays = write(store.url)
    assert store.singular_values().tolist() == arrays["sigma"].tolist()
    zarr.open_group(store.url, mode="a").attrs["status"] = "in-progress"
    assert store.singular_values() is None


def test_header_reads_metadata_and_checks_identity(tmp_path):
    store = SketchStore(str(tmp_path / "sketch.zarr"))
    write(store.url)
    head = store.header(expected=IDENTITY)
    assert (head["ell"], head["dim"], head["classes"]) == (4, 6, 2)
    assert head["identity"] == IDENTITY and head["stats"] == {"n": 12}
    with pytest.raises(MismatchError, match="ell: stored 4, now 8"):
        store.header(expected={**IDENTITY, "ell": 8})


def test_a_full_disk_while_writing_the_sketch_is_one_line(tmp_path, monkeypatch):
    """Issue 15, case 8: ENOSPC inside zarr is a StorageError, and the sketch stays unusable."""
    import errno

    from sage_stream.errors import StorageError
    from sage_stream.outputs import sketch_store

    real, calls = sketch_store._put, []

    def full(group, name, data, chunks):
        calls.append(name)
        if len(calls) == 2:  # the basis went in, then the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(group, name, data, chunks)

    monkeypatch.setattr(sketch_store, "_put", full)
    url = str(tmp_path / "sketch.zarr")
    with pytest.raises(
        StorageError, match=r"cannot write the sketch .*No space left on device"
    ) as e:
        write(url)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError):  # in-progress: never read as a finished sketch
        SketchStore(url).read(expected=IDENTITY)
