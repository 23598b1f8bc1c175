"""`sage-stream report OUT`: an HTML page with figures of what a finished run kept and why.

The last, optional step of the flow, after EMIT: it reads what the run wrote (``data``: scores/,
selection.parquet, the sketch's singular values, manifest.json; decisions.parquet's summary for
the mix of decisions per class), draws the figures (``figures``: matplotlib, the ``report`` extra), reads
back the few most and least agreeing samples for thumbnails (``thumbs``) and writes the page
(``page``) into ``OUT/report/``:

    OUT/report/index.html         self-contained page, opens from disk
    OUT/report/figures/*.png      spectrum, scores, classes, energy, shards
    OUT/report/thumbs/*.png       most-NN.png / least-NN.png, where a sample has a picture

No model is run. Every file goes through ``storage.atomic_write`` and the page is written last, so
a page that exists refers only to files that are complete; memory:// and s3:// outputs work.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError
from ..outputs import decisions_file
from ..outputs.folder import OutputFolder
from ..storage import join, write_bytes_atomic
from . import figures as figs
from .data import RunData, class_table, extremes, load_run, shard_table
from .page import Figure, SampleCard, render
from .thumbs import thumbnails

__all__ = ["write_report"]
log = logging.getLogger("sage_stream")

FIGURES = {  # name -> (alt text, why there may be none)
    "spectrum": ("sketch spectrum", "the run made no sketch (a baseline scorer)"),
    "scores": ("score histograms per class", "no sample has a SAGE score"),
    "classes": ("kept and dropped per class", "no sample was scored"),
    "energy": ("per-sample energy", "no sample has a recorded energy ρ"),
    "shards": ("keep rate per shard", "no shard has a scored sample"),
}


def _draw(run: RunData, classes: list[dict], shards: list[dict]) -> dict[str, bytes | None]:
    return {
        "spectrum": figs.spectrum(run.sigma, run.sketch_stats),
        "scores": figs.score_histograms(run),
        "classes": figs.class_counts(classes),
        "energy": figs.energy(run),
        "shards": figs.shard_keep_rates(shards),
    }


def _write_figures(
    report: str, drawn: dict[str, bytes | None], storage_options: dict | None
) -> dict[str, Figure]:
    placed = {}
    for name, png in drawn.items():
        alt, missing = FIGURES[name]
        if png is None:
            placed[name] = Figure(None, alt, missing)
            continue
        path = f"figures/{name}.png"
        write_bytes_atomic(join(report, path), png, storage_options)
        placed[name] = Figure(path, alt)
    return placed


def _cards(
    run: RunData, picks: dict[str, np.ndarray], report: str, storage_options: dict | None
) -> dict[str, list[SampleCard]]:
    """Sample cards for the most / least agreeing picks, with their thumbnails written."""
    wanted: dict[str, set[str]] = {}
    for index in np.concatenate(list(picks.values())):
        wanted.setdefault(str(run.shards[index]), set()).add(str(run.keys[index]))
    pictures = thumbnails(run.manifest, run.out, wanted, storage_options) if wanted else {}
    cards: dict[str, list[SampleCard]] = {}
    for kind, indices in picks.items():
        cards[kind] = []
        for rank, i in enumerate(indices.tolist()):
            shard, key = str(run.shards[i]), str(run.keys[i])
            thumb = None
            if (shard, key) in pictures:
                thumb = f"thumbs/{kind}-{rank:02d}.png"
                write_bytes_atomic(join(report, thumb), pictures[(shard, key)], storage_options)
            card = SampleCard(
                key,
                shard,
                int(run.labels[i]),
                float(run.scores[i]),
                float(run.energy[i]),
                bool(run.kept[i]),
                thumb,
            )
            cards[kind].append(card)
    return cards


def _remove_stale_thumbs(folder: OutputFolder, cards: list[SampleCard]) -> None:
    """Thumbnails of an earlier report (say, a larger --top) that the new page does not show."""
    thumbs = join(folder.report, "thumbs")
    shown = {c.thumb.rsplit("/", 1)[1] for c in cards if c.thumb}
    for old in folder.names(thumbs):
        if old not in shown:
            folder.remove(join(thumbs, old))


def write_report(out: str, *, storage_options: dict | None = None, top: int = 12) -> str:
    """Write OUT/report/ (page, figures, thumbnails) for a finished run; returns the page's URL.

    `top` is how many of the most and of the least agreeing samples to show (0: none).
    Raises InputError when OUT holds no finished run or matplotlib is not installed.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InputError(f"top must be a non-negative integer, got {top!r}")
    figs.require_matplotlib()
    run = load_run(out, storage_options)
    classes, shards = class_table(run), shard_table(run)
    folder = OutputFolder(out, storage_options or {})
    report = folder.report
    placed = _write_figures(report, _draw(run, classes, shards), storage_options)
    most, least = extremes(run, top)
    cards = _cards(run, {"most": most, "least": least}, report, storage_options)
    html = render(
        out=out,
        manifest=run.manifest,
        selection=run.selection,
        figures=placed,
        classes=classes,
        shards=shards,
        most=cards["most"],
        least=cards["least"],
        decisions=decisions_file.read_summary(folder) if folder.exists(folder.selection) else None,
    )
    url = join(report, "index.html")
    write_bytes_atomic(url, html.encode("utf-8"), storage_options)
    _remove_stale_thumbs(folder, cards["most"] + cards["least"])
    log.info("report: %s", url)
    return url
