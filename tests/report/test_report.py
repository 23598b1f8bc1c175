"""`sage-stream report`: the page, its figures and thumbnails, from a run's outputs only.

A tiny run over 8×8 PNG images (so thumbnails appear) is reported on, its page checked against
the run's own tables, and opened in headless Chromium, which must load every image.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shardmaker import make_tar_shard, png_bytes
from tiny import blobs, write_tar_set
from torch import nn

import sage_stream
from sage_stream.errors import InputError

pytest.importorskip("matplotlib", reason="the report needs the `report` extra (matplotlib)")
from sage_stream.report import write_report  # noqa: E402
from sage_stream.report.thumbs import THUMB_MIN, thumbnail_png, to_image  # noqa: E402

N, SIDE, CLASSES, TOP = 60, 8, 3, 4
OPTIONS = dict(ell=16, batch_size=32, device="cpu", keep=0.5, progress=False)
FIGURES = ("spectrum", "scores", "classes", "energy", "shards")
SETUP_SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "setup-chromium"


def images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) uint8 pictures of 3 patterns (row bar, column bar, diagonal) + noise, and
    labels with a sixth moved to another class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 60, size=(n, SIDE, SIDE))
    x[y == 0, 3:5, :] += 180
    x[y == 1, :, 3:5] += 180
    x[y == 2] += (np.eye(SIDE, dtype=np.int64) * 180)[None]
    flipped = rng.choice(n, size=n // 6, replace=False)
    y[flipped] = (y[flipped] + 1) % CLASSES
    return x.astype(np.uint8), y


def image_model() -> nn.Module:
    """Untrained on purpose: the report only reads what the run wrote, any scores will do."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    x, y = images(N)
    urls = []
    for s, idx in enumerate(np.array_split(np.arange(N), 3)):
        samples = {f"img{i:03d}": {"png": png_bytes(x[i]), "cls": str(y[i]).encode()} for i in idx}
        urls.append(make_tar_shard(root / "in" / f"part-{s}.tar", samples))
    out = root / "out"
    sage_stream.run(urls, model=image_model(), out=str(out), **OPTIONS)
    url = write_report(str(out), top=TOP)
    return {"out": out, "x": x, "url": url, "page": Path(url).read_text()}


def cards(page: str, title: str) -> list[tuple[str, str | None]]:
    """(key, thumbnail path or None) of the sample cards in the page's section `title`."""
    section = page.split(f"<h2>{title}", 1)[1].split("<h2>", 1)[0]
    found = re.findall(
        r'<div class="card">(?:<img src="([^"]+)"[^>]*>)?<code>([^<]+)</code>', section
    )
    return [(key, thumb or None) for thumb, key in found]


def scores_and_kept(out: Path) -> tuple[list[dict], set[tuple[str, str]]]:
    rows = [
        r for p in sorted((out / "scores").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    sel = pq.read_table(out / "selection.parquet").to_pylist()
    return rows, {(r["__shard__"], r["__key__"]) for r in sel}


def test_report_writes_page_and_every_file_it_references(image_run):
    out, page = image_run["out"], image_run["page"]
    assert image_run["url"] == str(out / "report" / "index.html")
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert sorted(s for s in sources if s.startswith("figures/")) == sorted(
        f"figures/{name}.png" for name in FIGURES
    )
    assert len([s for s in sources if s.startswith("thumbs/")]) == 2 * TOP
    for source in sources:
        assert not source.startswith(("/", "http", "file:")), source  # relative: opens from disk
        with Image.open(out / "report" / source) as image:
            assert image.format == "PNG" and min(image.size) >= THUMB_MIN // 2
    assert "<h2>Totals</h2>" in page and "<h2>Configuration</h2>" in page


def test_report_agrees_with_the_run_tables(image_run):
    out, page = image_run["out"], image_run["page"]
    rows, kept = scores_and_kept(out)
    ok = [r for r in rows if r["status"] == "ok" and r["score"] is not None]
    ranked = sorted(ok, key=lambda r: (-r["score"], r["__key__"]))
    assert [k for k, _ in cards(page, "Most agreeing")] == [r["__key__"] for r in ranked[:TOP]]
    least = sorted(ok, key=lambda r: (r["score"], r["__key__"]))[:TOP]
    assert [k for k, _ in cards(page, "Least agreeing")] == [r["__key__"] for r in least]
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    assert f"<td>{t['seen']}</td><td>{t['scored']}</td><td>{t['errored']}</td>" in page
    for label in range(CLASSES):  # the per-class table: label, scored, kept, dropped
        mine = [r for r in ok if r["label"] == label]
        k = sum((r["__shard__"], r["__key__"]) in kept for r in mine)
        assert (
            f'<td class="l">{label}</td><td>{len(mine)}</td><td>{k}</td><td>{len(mine) - k}</td>'
            in page
        )


def test_thumbnails_show_the_samples_pixels(image_run):
    out, x, page = image_run["out"], image_run["x"], image_run["page"]
    for key, thumb in cards(page, "Most agreeing") + cards(page, "Least agreeing"):
        assert thumb is not None, key
        with Image.open(out / "report" / thumb) as image:
            pixels = np.asarray(image)
        factor = pixels.shape[0] // SIDE
        assert pixels.shape == (SIDE * factor, SIDE * factor) and factor * SIDE >= THUMB_MIN
        np.testing.assert_array_equal(pixels[::factor, ::factor], x[int(key[3:])])


def test_report_is_deterministic(image_run):
    out = image_run["out"]
    before = {p: p.read_bytes() for p in (out / "report").rglob("*.png")}
    write_report(str(out), top=TOP)
    assert (out / "report" / "index.html").read_text() == image_run["page"]
    assert {p: p.read_bytes() for p in (out / "report").rglob("*.png")} == before


def test_thumbnails_fall_back_to_output_shards_when_inputs_are_gone(image_run, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(image_run["out"], copy)  # with the report: its thumbnails are now stale
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["inputs"]:
        entry["url"] = str(tmp_path / "moved" / entry["name"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = Path(write_report(str(copy), top=TOP)).read_text()
    kept = {key for _, key in scores_and_kept(copy)[1]}
    shown = cards(page, "Most agreeing") + cards(page, "Least agreeing")
    assert {key for key, _ in shown} & kept and {key for key, _ in shown} - kept  # both kinds
    for key, thumb in shown:  # kept: read from OUT/shards/; dropped: nowhere to read it from
        assert (thumb is not None) == (key in kept), key
    written = sorted(p.name for p in (copy / "report" / "thumbs").iterdir())
    assert written == sorted(Path(thumb).name for _, thumb in shown if thumb)  # stale ones gone


def test_report_on_memory_output_with_a_baseline_scorer(mem_url):
    x, _, noisy = blobs(45)
    urls = write_tar_set(f"{mem_url}/in", x, noisy)
    out = f"{mem_url}/out"
    sage_stream.run(urls, model="tiny:mlp", out=out, scorer="loss", **OPTIONS)
    url = write_report(out, top=3)
    assert url == f"{out}/report/index.html"
    fs = fsspec.filesystem("memory")
    page = fs.cat(url).decode()
    written = {p.rsplit("/report/", 1)[1] for p in fs.find(f"{out}/report")}
    assert written == {"index.html", "figures/classes.png", "figures/shards.png"}
    assert "No figure: the run made no sketch" in page and "No scored samples." in page


def test_to_image_accepts_picture_shapes_only():
    assert to_image(np.linspace(0, 1, 64)).shape == (8, 8)  # an 8×8 digit as a vector
    assert to_image(np.zeros((3, 5, 6))).shape == (5, 6, 3)  # CHW
    assert to_image(np.zeros((5, 6, 3), np.uint8)).shape == (5, 6, 3)  # HWC
    assert to_image(np.zeros((1, 1, 4, 4))).shape == (4, 4)
    assert to_image(np.arange(8.0)) is None  # not square
    assert to_image(np.zeros((2, 3, 4, 5))) is None
    assert to_image(np.array([np.nan, 1, 2, 3])) is None
    assert to_image(np.array(["a", "b", "c", "d"])) is None
    digit = to_image(np.array([0, 4, 8, 16.0]))  # not [0, 1]: stretched to the full range
    np.testing.assert_array_equal(digit, [[0, 64], [128, 255]])
    assert thumbnail_png({"txt": b"hello", "npy": b"not an array"}) is None
    row = thumbnail_png({"features": [float(v) for v in range(16)], "label": 2})  # Parquet row
    with Image.open(io.BytesIO(row)) as image:
        assert image.size == (THUMB_MIN, THUMB_MIN)  # 4×4, enlarged pixel for pixel


def test_write_report_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        write_report(str(tmp_path))
    with pytest.raises(InputError, match="top"):
        write_report(str(tmp_path), top=-1)


def test_write_report_without_matplotlib_says_which_extra(image_run, monkeypatch):
    from sage_stream.report import figures

    monkeypatch.setattr(figures, "Figure", None)
    with pytest.raises(InputError, match=r"sage-stream\[report\]"):
        write_report(str(image_run["out"]))


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed by .ci/setup-chromium when missing and we are root."""
    found = os.environ.get("SAGE_CHROMIUM") or shutil.which("chromium")
    if not found and os.geteuid() == 0 and SETUP_SCRIPT.exists():
        subprocess.run([str(SETUP_SCRIPT)], check=False, timeout=900)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("no chromium: run .ci/setup-chromium as root (apt-get install chromium)")
    return found


def headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
    ]
    return subprocess.run(
        [chromium, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_page_loads_every_image_in_headless_chromium(image_run, chromium, tmp_path):
    page_url = Path(image_run["url"]).as_uri()
    count = len(re.findall(r"<img ", image_run["page"]))
    dom = headless(chromium, tmp_path / "p1", "--dump-dom", page_url).stdout
    assert f'data-images-loaded="{count}/{count}"' in dom, dom[:300]
    shot = tmp_path / "page.png"
    headless(chromium, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1100,2400", page_url)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1100)
    assert (pixels < 128).mean() > 0.005 and pixels.std() > 10  # text and figures, not blank
