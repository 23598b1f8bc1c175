"""The report's HTML page: one self-contained file that opens from disk with no server.

Part of `sage-stream report`, after EMIT. Styles and the one small script are inline; figures
and thumbnails are PNG files next to the page, referenced by relative paths, so the folder can
be copied or served anywhere. Every text that comes from the data (keys, shard names, config
values) is HTML-escaped: shards are untrusted input. Nothing time-dependent is written, so the
same run gives the same page. On load, the script writes ``data-images-loaded="N/M"`` onto
``<body>`` (images that decoded / images on the page), which tests and humans can check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from ..select.coverage import FILTER_COLUMNS
from ..select.decisions import DECISIONS

MAX_TABLE_ROWS = 200

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem;
       margin-top: 2.2rem; }
.sub, .note { color: #666; } img.fig { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: .6rem 0; font-variant-numeric: tabular-nums; }
td, th { border: 1px solid #ddd; padding: .2rem .55rem; text-align: right; }
th { background: #f5f5f5; } td.l, th.l { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: .6rem; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: .4rem; width: 150px;
        font-size: 12px; word-break: break-all; }
.card img { display: block; margin: 0 auto .3rem; image-rendering: pixelated; }
.kept { color: #1f77b4; font-weight: 600; } .dropped { color: #c25a00; font-weight: 600; }
code { font-size: 12px; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) loaded++;
  }
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
});
"""


@dataclass
class Figure:
    """A section's figure: its file under report/ (None when there was nothing to draw)."""

    path: str | None
    alt: str
    missing: str = ""  # why there is no figure


@dataclass
class SampleCard:
    key: str
    shard: str
    label: int
    score: float
    energy: float
    kept: bool
    thumb: str | None  # file under report/, or None


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None / NaN as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def fixed(value: float | None, decimals: int = 4) -> str:
    """A score-like number with fixed decimals (0.99996 must not print as 1)."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{decimals}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned text, the rest numbers."""

    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{escape(fmt(value))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(fig: Figure) -> str:
    if fig.path is None:
        return f'<p class="note">No figure: {escape(fig.missing)}</p>'
    return f'<p><img class="fig" src="{escape(fig.path)}" alt="{escape(fig.alt)}"></p>'


def cards(samples: Sequence[SampleCard]) -> str:
    if not samples:
        return '<p class="note">No scored samples.</p>'
    out = []
    for s in samples:
        img = f'<img src="{escape(s.thumb)}" alt="{escape(s.key)}">' if s.thumb else ""
        state = (
            '<span class="kept">kept</span>' if s.kept else '<span class="dropped">dropped</span>'
        )
        out.append(
            f'<div class="card">{img}<code>{escape(s.key)}</code><br>'
            f"{escape(s.shard)}<br>label {s.label} · s = {fixed(s.score)}<br>"
            f"ρ = {fixed(s.energy, 3)} · {state}</div>"
        )
    return '<div class="grid">' + "".join(out) + "</div>"


def _capped(rows: Sequence[Any], what: str) -> tuple[Sequence[Any], str]:
    if len(rows) <= MAX_TABLE_ROWS:
        return rows, ""
    return rows[
        :MAX_TABLE_ROWS
    ], f'<p class="note">First {MAX_TABLE_ROWS} of {len(rows)} {what}.</p>'


def class_section(rows: list[dict[str, Any]]) -> str:
    shown, note = _capped(rows, "classes")
    body = [
        (
            r["label"],
            r["scored"],
            r["kept"],
            r["dropped"],
            fixed(r["keep_rate"], 3),
            fixed(r["median_kept"]),
            fixed(r["median_dropped"]),
        )
        for r in shown
    ]
    header = (
        "class",
        "scored",
        "kept",
        "dropped",
        "keep rate",
        "median s kept",
        "median s dropped",
    )
    return table(header, body) + note


def decision_section(summary: Mapping[str, Any] | None) -> str:
    """Per class, why its samples were kept or not (decisions.parquet; select/decisions.py)."""
    if summary is None:
        return ('<p class="note">This selection recorded no decisions (made by an earlier '
                "version): rerun <code>sage-stream select</code>.</p>")  # fmt: skip
    rows, note = _capped(summary["classes"], "classes")
    names = [d for d in DECISIONS if any(d in r["decisions"] for r in rows)]
    numbers = [k for k in FILTER_COLUMNS if any(k in r for r in rows)]  # sage-coverage's filter
    header = ["class", "rows", "cut", *(k.replace("_", " ") for k in numbers), *names]
    body = [
        [r["label"], r["rows"], fmt(r["cut"]), *(fmt(r.get(k)) for k in numbers),
         *(r["decisions"].get(d, 0) for d in names)]
        for r in rows
    ]  # fmt: skip
    return (
        '<p class="note">Each sample\'s decision is in <code>decisions.parquet</code>; '
        "<code>sage-stream inspect OUT --key KEY</code> explains one. The cut is the "
        "ranking value of the class's last kept sample (the threshold with --min-score).</p>"
        + table(header, body)
        + note
    )


def shard_section(rows: list[dict[str, Any]]) -> str:
    shown, note = _capped(rows, "shards")
    body = [
        (
            r["name"],
            r["seen"],
            r["scored"],
            r["errored"],
            r["kept"],
            fixed(r["keep_rate"], 3),
            r["shard_error"] or "",
        )
        for r in shown
    ]
    header = ("shard", "seen", "scored", "errored", "kept", "keep rate", "stream error")
    return table(header, body) + note


def key_values(values: Mapping[str, Any]) -> str:
    rows = []
    for name in sorted(values):
        value = values[name]
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        rows.append((name, text))
    return table(("name", "value"), rows, left=2)


def render(
    *,
    out: str,
    manifest: Mapping[str, Any],
    selection: Mapping[str, Any],
    figures: Mapping[str, Figure],
    classes: list[dict[str, Any]],
    shards: list[dict[str, Any]],
    most: Sequence[SampleCard],
    least: Sequence[SampleCard],
    decisions: Mapping[str, Any] | None = None,
) -> str:
    """The whole page as a string."""
    totals = manifest.get("totals") or {}
    sketch = dict(manifest.get("sketch") or {})
    identity = sketch.pop("identity", None) or {}
    total_names = ("seen", "scored", "errored", "kept", "dropped")
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>sage-stream report</title>",
        f"<style>{STYLE}</style></head>",
        '<body data-images-loaded="pending">',
        "<h1>sage-stream report</h1>",
        f'<p class="sub">Run output <code>{escape(out)}</code> · scorer '
        f"<b>{escape(str(selection.get('scorer', '?')))}</b> · computed from scores/, "
        "selection.parquet, sketch.zarr and manifest.json (no model run)</p>",
        *(
            f'<p class="note"><b>Warning:</b> {escape(str(w))}</p>'
            for w in (manifest.get("warnings") or selection.get("warnings") or [])
        ),
        "<h2>Totals</h2>",
        table(total_names, [[totals.get(k) for k in total_names]], left=0),
        "<h3>Selection</h3>",
        key_values(selection),
        "<h2>Sketch spectrum</h2>",
        key_values(sketch) if sketch else '<p class="note">No sketch in this run.</p>',
        figure(figures["spectrum"]),
        "<h2>Score distributions per class: kept against dropped</h2>",
        figure(figures["scores"]),
        "<h2>Kept and dropped per class</h2>",
        figure(figures["classes"]),
        class_section(classes),
        "<h2>Why samples were kept or dropped, per class</h2>",
        decision_section(decisions),
        "<h2>Per-sample energy ρ</h2>",
        '<p class="note">ρ_i = ‖V g_i‖² / ‖g_i‖²: the share of a sample\'s gradient inside '
        "the sketch's subspace; a low ρ means the sketch sees little of that sample.</p>",
        figure(figures["energy"]),
        "<h2>Keep rate per shard</h2>",
        figure(figures["shards"]),
        shard_section(shards),
        f"<h2>Most agreeing samples (top {len(most)})</h2>",
        cards(most),
        f"<h2>Least agreeing samples (bottom {len(least)})</h2>",
        cards(least),
        "<h2>Configuration</h2>",
        key_values(manifest.get("config") or {}),
        "<h3>Sketch identity</h3>" + key_values(identity) if identity else "",
        "<h3>Versions</h3>",
        key_values(manifest.get("versions") or {}),
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
