"""Every job definition in pipelines/ is exercised as shipped, on tiny data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from shardmaker import make_parquet_shard

from sage_stream.cli import main
from sage_stream.config import load_toml, make_config
from sage_stream.demo import run_demo

PIPELINES = Path(__file__).parent.parent / "pipelines"


def test_every_config_file_is_valid():
    for path in sorted(PIPELINES.glob("*.toml")):
        options = load_toml(str(path))
        make_config(**options)  # unknown keys or bad values raise


def test_local_folder_job_runs_on_the_demo_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_demo(out="sage-demo")  # the folder the config points at, as the README says
    assert main(["run", "--config", str(PIPELINES / "local-folder.toml"), "--no-progress"]) == 0
    assert "kept 420" in capsys.readouterr().out  # keep 0.3 of 1,400 digits
    assert (tmp_path / "sage-local-out" / "_SUCCESS").exists()


def test_parquet_job_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(PIPELINES.parent))  # examples.models
    rng = np.random.default_rng(0)
    for s in range(2):
        labels = rng.integers(0, 4, 40)
        table = pa.table(
            {
                "__key__": [f"s{s}-{i:03d}" for i in range(40)],
                "features": (rng.normal(size=(40, 16)) + labels[:, None]).tolist(),
                "label": labels,
            }
        )
        make_parquet_shard(tmp_path / "data" / "parquet" / f"part-{s}.parquet", table)
    argv = ["run", "--config", str(PIPELINES / "parquet.toml"), "--ell", "16", "--no-progress"]
    assert main(argv) == 0
    assert "seen 80  scored 80  errored 0  kept 24" in capsys.readouterr().out
