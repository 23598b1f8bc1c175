"""The embedded default: real digits, flipped labels, the whole stage, a readable report."""

from sage_stream.cli import main


def test_demo_drops_flipped_labels(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines()}
    share = {
        which: float(lines[f"flipped labels among {which}"].split()[-1].rstrip("%"))
        for which in ("all samples", "kept samples")
    }
    assert share["all samples"] == 20.0
    assert share["kept samples"] < 0.6 * share["all samples"]  # measured: 9.1% kept
    assert (tmp_path / "demo" / "run" / "_SUCCESS").exists()
