"""Smoke tests of benchmarks/: each script's --quick mode runs and writes a sane results file,
and the per-case caps record a method that runs out as "oom" or "timeout".

No assertion here is on a timing. Memory flatness is asserted (16× the samples, the same peak),
because streaming is the property the memory benchmark exists to show.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow  # child processes, each importing torch: ~45 s in all


def _common():
    spec = importlib.util.spec_from_file_location("sage_bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    results = tmp_path / "results"
    cmd = [sys.executable, str(BENCH / name), "--quick", "--results", str(results)]
    cmd += ["--work", str(tmp_path / "work"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = results.glob("*-quick.json")
    return json.loads(path.read_text())


def test_memory_is_flat_from_n_to_16n(tmp_path):
    r = run_script("memory.py", tmp_path)
    assert [row["n"] for row in r["rows"]] == [150, 600, 2400]
    assert all(row["status"] == "ok" for row in r["rows"])
    growth = r["peak_growth_largest_over_smallest"]
    assert growth["sketch"] < 1.25 and growth["score"] < 1.25  # measured: about 1.05
    assert growth["dedup_select"] < 1.25  # near-copy removal in bounded memory too


def test_throughput_compares_passes_emit_and_fd(tmp_path):
    r = run_script("throughput.py", tmp_path)
    p = r["passes"]
    assert p["status"] == "ok"
    assert p["emitted"]["seen"] == p["emitted"]["kept"] == p["samples"]  # keep 1.0: all copied
    assert set(p["samples_per_s"]) == {"forward", "sketch", "score", "select", "emit", "raw_copy"}
    assert all(v > 0 for v in p["samples_per_s"].values())
    grid = {(row["dim"], row["ell"]) for row in r["fd"]["rows"]}
    assert grid == {(256, 32), (1024, 32), (256, 16)}


def test_peers_select_the_same_budget_and_sage_tracks_the_exact_svd(tmp_path):
    r = run_script("peers.py", tmp_path)
    status = {row["method"]: row["status"] for row in r["rows"]}
    assert status["sage"] == status["hand_svd"] == "ok"
    assert all(status[m] in ("ok", "not installed") for m in ("craig", "gradmatch", "trak"))
    q = r["quality"]
    assert q["methods"]["sage"]["kept"] == q["methods"]["random"]["kept"] == round(0.3 * 400)
    assert q["jaccard_sage_vs_exact_svd"] >= 0.8  # FD with ℓ = 256 keeps almost the same set
    assert q["methods"]["sage"]["flipped_share_kept"] < q["flipped_share_all"] / 2


def test_gpu_script_smoke_runs_on_the_cpu(tmp_path):
    r = run_script("gpu.py", tmp_path, "--device", "cpu")
    assert r["status"] == "ok" and r["benchmark"] == "gpu"
    assert r["model"]["grad_dim"] == 100 * (8 * 8 + 1)  # C·(H+1) of the narrow quick CNN
    assert r["sketch_over_forward"] == pytest.approx(
        r["samples_per_s"]["sketch"] / r["samples_per_s"]["forward"], rel=1e-3
    )
    assert r["sketch_stats"]["n"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_device_cuda_is_refused_clearly_without_a_gpu(tmp_path):
    cmd = [sys.executable, str(BENCH / "gpu.py"), "--quick", "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "sees no CUDA device" in proc.stderr


def test_a_case_past_the_memory_cap_is_recorded_as_oom():
    common = _common()
    result = common.run_case("allocate", {"gib": 4}, common.Caps(timeout_s=120, mem_gib=2))
    assert result["status"] == "oom", result


def test_the_memory_cap_counts_from_what_torch_maps_at_import():
    # torch's CUDA build maps about 3 GiB at import, its CPU build about 0.6 GiB: under a cap
    # on the total, this 1 GiB case fitted 2 GiB with one build and failed to import the other
    common = _common()
    result = common.run_case("allocate", {"gib": 1}, common.Caps(timeout_s=120, mem_gib=2))
    assert result["status"] == "ok", result


def test_a_case_past_the_time_cap_is_recorded_as_timeout():
    common = _common()
    result = common.run_case("sleep", {"seconds": 60}, common.Caps(timeout_s=2, mem_gib=4))
    assert result["status"] == "timeout" and result["child_wall_s"] < 30


def test_scale_select_streams_the_in_memory_answer(tmp_path):
    r = run_script("scale_select.py", tmp_path)
    rows = {(row["n"], row["case"]): row for row in r["rows"]}
    assert all(row["status"] == "ok" for row in r["rows"])
    assert rows[(20_000, "streaming")]["kept"] == rows[(20_000, "in_memory")]["kept"] > 0
    assert r["streaming_peak_growth_largest_over_smallest"] < 1.25  # 4× the rows, same peak


def test_select_speed_runs_select_and_its_pyarrow_baseline(tmp_path):
    r = run_script("select_speed.py", tmp_path, "--runs", "1")
    for name in ("rows", "rows_signed"):  # the same rows with signatures: the class-mean rule
        rows = r[name]
        (select,), (base,) = rows["select"], rows["baseline"]
        assert select["status"] == base["status"] == "ok", r
        assert base["kept"] == 6000 and 0 < select["kept"] <= 6000  # error rows are never kept
        assert rows["ratio_median"] > 0
    (signed_base,) = r["rows_signed"]["baseline_signed"]  # reading the signatures too
    assert signed_base["status"] == "ok" and signed_base["kept"] == 6000
    assert r["rows_signed"]["ratio_vs_baseline_signed_median"] > 0
    (threaded,) = r["rows_signed_threads"]["select"]  # the same select with a user's threads
    assert threaded["status"] == "ok" and threaded["kept"] == r["rows_signed"]["select"][0]["kept"]
    assert r["rows_signed_threads"]["select_wall_s_median"] > 0
    for name in ("shards", "shards_signed"):
        assert r[name]["select"][0]["status"] == "ok" and r[name]["ms_per_shard_median"] > 0


def test_tar_writer_times_emit_writes_against_plain_writes(tmp_path):
    r = run_script("tar_writer.py", tmp_path)
    assert [row["member_bytes"] for row in r["rows"]] == [10_000, 100_000, 1_000_000]
    assert all(row["writer_ms"] > 0 and row["members"] >= 2 for row in r["rows"])
