"""Every job script in examples/ runs as shipped, on the tiny data it makes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
COMMON = ["--no-progress", "--device", "cpu", "--ell", "8", "--loader-workers", "0"]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # examples.models, as from the repository root


VIT = ["--model", "examples.models:vit_classifier"]  # the README's image job without torchvision


@pytest.mark.parametrize(
    "name, needs, summary, extra",
    [
        ("image_job", None, "seen 48  scored 48  errored 0  kept 24", []),
        ("image_job", "transformers", "seen 48  scored 48  errored 0  kept 24", VIT),
        ("hf_parquet_job", "datasets", "seen 40  scored 40  errored 0  kept 20", []),
        ("text_job", "transformers", "seen 36  scored 36  errored 0  kept 18", []),
    ],
)
def test_example_job_runs(name, needs, summary, extra, tmp_path, capsys):
    if needs:
        pytest.importorskip(needs)
    job = importlib.import_module(f"examples.{name}")
    assert job.main([str(tmp_path), *COMMON, *extra]) == 0
    assert summary in capsys.readouterr().out
    assert (tmp_path / "out" / "_SUCCESS").exists()
