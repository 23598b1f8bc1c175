"""The embedded default: real digits, flipped labels, the whole stage, a readable report."""

import torch

from sage_stream.cli import main

# What the README shows, to the printed digit. The demo computes on one thread, draws its
# starting weights with numpy and trains in float64, so these hold for any thread count, CPU
# kernel (AVX-512, AVX2, baseline) and torch build (CPU or CUDA) that was tried.
README_FIGURES = {
    "flipped labels among all samples": "20.0%",
    "flipped labels among kept samples": "1.3%",
    "flipped labels among dropped": "38.7%",
    "test accuracy (clean labels) of a model trained on": (
        "all noisy 0.788 | SAGE-kept 0.914 | random subset of the same size 0.743"
    ),
}


def _lines(out: str) -> dict[str, str]:
    return {line.split(":")[0].strip(): line for line in out.splitlines()}


def test_demo_drops_flipped_labels(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    lines = _lines(capsys.readouterr().out)
    share = {
        which: float(lines[f"flipped labels among {which}"].split()[-1].rstrip("%"))
        for which in ("all samples", "kept samples")
    }
    assert share["all samples"] == 20.0
    assert share["kept samples"] < 0.6 * share["all samples"]  # measured: 4.6% kept
    assert (tmp_path / "demo" / "run" / "_SUCCESS").exists()


def test_demo_prints_the_readme_figures_whatever_the_thread_count(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo runs on one thread regardless, and gives it back
    try:
        assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    lines = _lines(capsys.readouterr().out)
    assert {k: lines[k].split(":", 1)[1].strip() for k in README_FIGURES} == README_FIGURES
