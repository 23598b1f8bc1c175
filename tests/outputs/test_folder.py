"""OutputFolder: the names under OUT, claiming it, _SUCCESS, temporaries, checkpoints."""

from __future__ import annotations

import pytest
import torch

from sage_stream.errors import InputError, OutputExistsError
from sage_stream.outputs.folder import ENTRIES, OutputFolder

IDENTITY = {"inputs": ["a.tar"], "model": "abc", "ell": 16}


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path, mem_url) -> OutputFolder:
    return OutputFolder(str(tmp_path / "out") if request.param == "local" else f"{mem_url}/out")


def test_every_name_is_under_out(folder):
    names = [folder.sketch, folder.scores, folder.part("a.tar"), folder.selection,
             folder.shard("a.tar"), folder.manifest, folder.index, folder.success,
             folder.report, folder.work("run.json"), folder.emitted_marker("h", "a.tar")]  # fmt: skip
    assert all(n.startswith(folder.url + "/") for n in names)
    assert folder.part("a.tar").endswith("scores/part-a.tar.parquet")
    assert folder.emitted_marker("h", "a.tar").endswith("_work/emitted-h/a.tar")
    assert len(set(names)) == len(names)


def test_json_round_trip_and_absent_is_none(folder):
    assert folder.read_json(folder.manifest) is None
    folder.write_json(folder.manifest, {"b": 1, "a": [1, 2]})
    assert folder.read_json(folder.manifest) == {"b": 1, "a": [1, 2]}
    with folder.open(folder.manifest) as f:
        assert f.read().endswith(b"\n")  # sorted, indented, one trailing newline


def test_claim_records_identity_and_refuses_another(folder):
    folder.claim(IDENTITY, {"ell": 16}, overwrite=False)
    assert folder.stored_identity() == IDENTITY
    assert folder.recorded_config() == {"ell": 16}
    folder.claim(IDENTITY, {"ell": 16}, overwrite=False)  # the same run again: fine
    folder.write_bytes(folder.part("a.tar"), b"x")  # a finished scores part: work to lose
    with pytest.raises(OutputExistsError, match="differs in: ell, model"):
        folder.claim({**IDENTITY, "ell": 8, "model": "xyz"}, {}, overwrite=False)


def test_a_run_in_which_no_pass_finished_may_start_again_changed(folder, caplog):
    folder.claim(IDENTITY, {"ell": 16}, overwrite=False)
    folder.write_bytes(
        folder.work("pass1-unit-00000-of-00002.pt"), b"x"
    )  # a checkpoint: unfinished
    assert folder.finished_work() == []
    folder.claim({**IDENTITY, "ell": 8}, {"ell": 8}, overwrite=False)
    assert "no pass finished (it differs in: ell)" in caplog.text
    assert folder.stored_identity()["ell"] == 8 and folder.recorded_config() == {"ell": 8}
    assert not folder.exists(folder.work("pass1-unit-00000-of-00002.pt"))  # the other run's, gone


def test_overwrite_wipes_exactly_the_run_entries(folder):
    folder.claim(IDENTITY, {}, overwrite=False)
    folder.write_bytes(folder.part("a.tar"), b"x")
    folder.write_bytes(folder.decisions, b"x")
    folder.write_bytes(folder.path("mine.txt"), b"not ours")
    folder.claim({**IDENTITY, "ell": 8}, {}, overwrite=True)
    assert not folder.exists(folder.part("a.tar"))
    assert not folder.exists(folder.decisions)
    assert folder.exists(folder.path("mine.txt"))  # not a name of the run: left alone
    assert folder.stored_identity()["ell"] == 8
    assert "_work" in ENTRIES and "scores" in ENTRIES


def test_identity_falls_back_to_the_manifest_after_success(folder):
    folder.write_json(folder.manifest, {"identity": IDENTITY, "config": {"x": 1}})
    assert folder.stored_identity() == IDENTITY and folder.recorded_config() == {"x": 1}


def test_success_marker_and_finish(folder):
    folder.write_json(folder.work("run.json"), IDENTITY)
    assert not folder.is_complete()
    folder.mark_success()
    assert folder.is_complete()
    folder.finish()
    assert not folder.exists(folder.work())
    folder.clear_success()
    folder.clear_success()  # nothing there: no error
    assert not folder.is_complete()


def test_remove_temporaries_only_takes_leftovers(folder):
    keep = [folder.part("a.tar"), folder.shard("a.tar"), folder.manifest,
            folder.shard("b.tar.tmp-abcdef012345")]  # fmt: skip
    junk = [folder.work("tmp", "0123456789ab-b.tar")]
    for url in keep + junk:
        folder.write_bytes(url, b"x")
    folder.remove_temporaries()
    assert all(folder.exists(u) for u in keep) and not any(folder.exists(u) for u in junk)


def test_writes_leave_their_temporaries_in_the_work_area_only(folder):
    """A write that fails leaves nothing beside its name; one that is cut off (kill) leaves
    its temporary in _work/tmp/, which remove_temporaries clears whole."""
    with pytest.raises(RuntimeError), folder.writer(folder.shard("a.tar")) as f:
        f.write(b"half")
        assert folder.names(folder.work("tmp"))  # the temporary is there, not in shards/
        assert folder.names(folder.path("shards")) == []
        raise RuntimeError("cut off")
    assert not folder.exists(folder.shard("a.tar"))
    assert folder.names(folder.work("tmp")) == []


def test_scored_shards_lists_parts_sorted(folder):
    with pytest.raises(InputError, match="run `sage-stream score` first"):
        folder.scored_shards()
    for name in ("b.tar", "a.parquet"):
        folder.write_bytes(folder.part(name), b"x")
    folder.write_bytes(folder.path("scores", "notes.txt"), b"x")
    assert folder.scored_shards() == ["a.parquet", "b.tar"]


def test_checkpoint_round_trip_loads_weights_only(folder):
    url = folder.work("pass1.pt")
    assert folder.load_state(url) is None
    folder.save_state(url, {"t": torch.arange(3), "names": ["a"]})
    back = folder.load_state(url)
    assert torch.equal(back["t"], torch.arange(3)) and back["names"] == ["a"]


def test_selection_hash_follows_the_bytes(folder):
    folder.write_bytes(folder.selection, b"one")
    first = folder.selection_hash()
    folder.write_bytes(folder.selection, b"two")
    assert folder.selection_hash() != first and len(first) == 16
