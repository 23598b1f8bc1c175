"""The report's figures: matplotlib on the Agg canvas, each returned as PNG bytes.

Part of `sage-stream report`, after EMIT: pure functions from the arrays of ``data.RunData``
to images, no storage. ``Figure`` objects are made directly (never ``pyplot``), so nothing
global changes in the caller's process (a notebook keeps its backend) and no display is needed.
A figure with nothing to show returns None and the page says why.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..errors import InputError
from .data import RunData

try:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError:  # optional extra: the rest of sage-stream does not need it
    Figure = MaxNLocator = None  # type: ignore[assignment,misc]

KEPT, DROPPED = "#1f77b4", "#ff7f0e"  # matplotlib's tab:blue / tab:orange, colour-blind safe
MAX_HIST_CLASSES = 15  # score histograms: "all" plus the largest classes
MAX_BAR_CLASSES = 40  # kept/dropped bars: the largest classes
MAX_SHARD_BARS = 120  # above this, a histogram of the shards' keep rates instead of bars
SCATTER_POINTS = 20_000
NBINS = 40


def require_matplotlib() -> None:
    if Figure is None:
        raise InputError("the report draws with matplotlib: pip install 'sage-stream[report]'")


def _bins(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """NBINS + 1 edges over the data's range (padded), inside [lo, hi] where the values live."""
    values = values[np.isfinite(values)]
    a, b = (float(values.min()), float(values.max())) if values.size else (lo, hi)
    pad = 0.02 * (b - a) if b > a else 0.01
    return np.linspace(max(lo, a - pad), min(hi, b + pad), NBINS + 1)


def _hist(ax: Any, values: np.ndarray, kept: np.ndarray, bins: np.ndarray) -> None:
    """Kept and dropped as translucent filled steps with outlines (neither hides the other).

    One polygon per series, not one rectangle per bin: many panels stay cheap to draw.
    """
    for mask, color, label in ((kept, KEPT, "kept"), (~kept, DROPPED, "dropped")):
        ax.hist(values[mask], bins=bins, histtype="stepfilled", color=color, alpha=0.35)
        ax.hist(values[mask], bins=bins, histtype="step", color=color, lw=1.3, label=label)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def spectrum(sigma: np.ndarray | None, stats: dict[str, Any] | None) -> bytes | None:
    """Singular values σ_j (log scale) and the share of ‖A‖²_F captured by the first k."""
    if sigma is None or sigma.size == 0 or not np.any(sigma > 0):
        return None
    frob = float((stats or {}).get("frobenius_sq") or 0.0)
    energy = sigma.astype(np.float64) ** 2  # (ℓ,)
    total = frob if frob > 0 else float(energy.sum())
    j = np.arange(1, sigma.size + 1)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    positive = sigma > 0
    ax1.semilogy(j[positive], sigma[positive], marker=".", markersize=3, lw=1)
    ax1.set(xlabel="index j", ylabel=r"singular value $\sigma_j$", title="Sketch spectrum")
    ax1.grid(alpha=0.3, which="both")
    ax2.plot(j, np.cumsum(energy) / total, lw=1.5)
    share = energy.sum() / total
    ax2.axhline(share, color="gray", ls="--", lw=1)
    ax2.text(j[-1], share - 0.02, f"all {sigma.size} directions: {share:.3f}", va="top", ha="right")
    ax2.set(xlabel="k (leading directions)", ylabel=r"share of $\|A\|_F^2$", ylim=(0, 1.02))
    ax2.set_title(r"Captured: $\Sigma_{j \leq k}\, \sigma_j^2 \,/\, \|A\|_F^2$")
    ax2.grid(alpha=0.3)
    return _png(fig)


def _largest_classes(run: RunData, limit: int) -> list[int]:
    labels, counts = np.unique(run.labels[run.ok], return_counts=True)
    order = np.lexsort((labels, -counts))[:limit]  # most samples first, ties by label
    return sorted(labels[order].tolist())


def score_histograms(run: RunData) -> bytes | None:
    """Per class, the score histogram of kept against dropped samples ("all" first)."""
    scored = run.ok & np.isfinite(run.scores)
    if not scored.any():
        return None
    panels = [("all classes", scored)]
    panels += [
        (f"class {c}", scored & (run.labels == c)) for c in _largest_classes(run, MAX_HIST_CLASSES)
    ]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    width, height = 3.2 * cols, 2.4 * rows
    fig = Figure(figsize=(width, height))
    # Fixed margins in inches: a layout engine costs as much as drawing all the panels.
    fig.subplots_adjust(
        left=0.75 / width,
        right=1 - 0.1 / width,
        bottom=0.6 / height,
        top=1 - 0.3 / height,
        wspace=0.25,
        hspace=0.45,
    )
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    bins = _bins(run.scores[scored], -1.0, 1.0)  # one scale for every panel
    for ax, (title, mask) in zip(axes, panels, strict=False):
        _hist(ax, run.scores[mask], run.kept[mask], bins)
        ax.set_title(f"{title} (n={int(mask.sum())})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # narrow score ranges: few, readable ticks
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.supxlabel(r"agreement score $s_i$", fontsize=9, y=0.15 / height)
    fig.supylabel("samples", fontsize=9, x=0.15 / width)
    return _png(fig)


def class_counts(rows: list[dict[str, Any]]) -> bytes | None:
    """Kept and dropped samples per class, stacked bars (the largest classes)."""
    if not rows:
        return None
    shown = sorted(rows, key=lambda r: (-r["scored"], r["label"]))[:MAX_BAR_CLASSES]
    shown.sort(key=lambda r: r["label"])
    x = np.arange(len(shown))
    kept = np.array([r["kept"] for r in shown])
    dropped = np.array([r["dropped"] for r in shown])
    fig = Figure(figsize=(max(6.0, 0.35 * len(shown) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(x, kept, color=KEPT, label="kept")
    ax.bar(x, dropped, bottom=kept, color=DROPPED, label="dropped")
    ax.set_xticks(x, [str(r["label"]) for r in shown], fontsize=8)
    suffix = f" ({len(shown)} largest of {len(rows)})" if len(shown) < len(rows) else ""
    ax.set(xlabel="class (label)", ylabel="samples", title=f"Kept and dropped per class{suffix}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def energy(run: RunData) -> bytes | None:
    """ρ_i, the share of each gradient's energy inside the sketch: histogram and ρ vs score."""
    has = run.ok & np.isfinite(run.energy)
    if not has.any():
        return None
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    _hist(ax1, run.energy[has], run.kept[has], _bins(run.energy[has], 0.0, 1.0))
    ax1.set(xlabel=r"energy captured $\rho_i = \|V g_i\|^2 / \|g_i\|^2$", ylabel="samples")
    ax1.set_title("Per-sample energy in the sketch")
    ax1.legend(fontsize=8)
    both = np.flatnonzero(has & np.isfinite(run.scores))
    if both.size:
        step = max(1, both.size // SCATTER_POINTS)  # every step-th sample: deterministic
        pick = both[::step]
        for mask, color, label in (
            (run.kept[pick], KEPT, "kept"),
            (~run.kept[pick], DROPPED, "dropped"),
        ):
            dots = pick[mask]
            ax2.scatter(
                run.scores[dots], run.energy[dots], c=color, s=6, alpha=0.6, lw=0, label=label
            )
        ax2.legend(fontsize=8, markerscale=2)
    ax2.set(xlabel=r"agreement score $s_i$", ylabel=r"$\rho_i$")
    ax2.set_title("Energy against score")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _png(fig)


def shard_keep_rates(rows: list[dict[str, Any]]) -> bytes | None:
    """Keep rate (kept / scored) per shard: bars for a few shards, a histogram for many."""
    rates = np.array([r["keep_rate"] for r in rows], dtype=np.float64)
    finite = np.isfinite(rates)
    if not finite.any():
        return None
    overall = sum(r["kept"] for r in rows) / max(1, sum(r["scored"] for r in rows))
    fig = Figure(figsize=(max(6.0, min(14.0, 0.3 * len(rows) + 2)), 3.6), layout="constrained")
    ax = fig.subplots()
    if len(rows) <= MAX_SHARD_BARS:
        x = np.arange(len(rows))
        ax.bar(x, np.where(finite, rates, 0.0), color=KEPT)
        ax.axhline(overall, color="gray", ls="--", lw=1, label=f"overall {overall:.3f}")
        ax.set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="kept / scored", ylim=(0, 1.0), title="Keep rate per shard")
    else:
        # matplotlib takes any array-like bins; its stub lists only Sequence[float]
        ax.hist(rates[finite], bins=np.linspace(0, 1, 51), color=KEPT)  # type: ignore[arg-type]
        ax.axvline(overall, color="gray", ls="--", lw=1, label=f"overall {overall:.3f}")
        ax.set(xlabel="kept / scored", ylabel="shards", title=f"Keep rate of {len(rows)} shards")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)
