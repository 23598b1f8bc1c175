"""Offline study of ranking rules on the scores the stage wrote (issue 28), cached between runs.

For each (data set, scenario) of `quality_data.py` the stage runs once (`sage_stream.run`,
sage-coverage, keep 0.1), and its scores table, with the near-copies `--dedup on` finds
(`select.dedup.find_duplicates`) as a column ``dup``, is cached under ``--cache`` (reused by
later runs). Each candidate rule below is numpy over that table: a ranking value per row,
higher kept first; the top of each class by proportional quotas (as `select` takes them,
`kept`) trains a fresh model per seed, judged as in `quality.py` (`quality.cell`).
Accuracies are cached too, per cell and subsets (all seeds), so adding a rule trains only
that rule. The cache (default $TMPDIR/sage-quality-rank) is keyed by data set and scenario only:
delete it after a change to the stage's scores or to `quality_data.py`.
Prints per cell each rule's accuracy minus the random scorer's and issue 28's targets met or
not; writes the records as JSON (``--output``).

    nice python benchmarks/quality_rank.py --data digits,control --rules default,random,...

This is a study, not the stage: the rule that wins is implemented in sage_stream/select/ and
measured again through the stage with `quality.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from quality import cell
from quality_data import BUILDERS, DATASETS, KEEPS, prepare

import sage_stream
from sage_stream.select import coverage, orderings
from sage_stream.select.dedup import find_duplicates
from sage_stream.select.parts import local_map
from sage_stream.select.quotas import proportional_quotas

CACHE = Path(tempfile.gettempdir()) / "sage-quality-rank"  # scores and accuracies, reused
COLUMNS = ("score", "loss", "grad_norm", "energy", "coverage", "margin")


@dataclass
class Pool:
    """One scenario's scores as numpy columns (candidates only, in key order)."""

    table: pa.Table
    col: dict[str, np.ndarray]
    label: np.ndarray
    dup: np.ndarray  # near-copy of an earlier candidate (--dedup on's rule)

    def uniform(self, seed: int) -> np.ndarray:
        """(N,) in (0, 1), hashed from seed and key: the rules' seeded draw."""
        keys = self.table["__key__"].to_pylist()
        digests = b"".join(hashlib.blake2b(f"rank\0{seed}\0{k}".encode(), digest_size=8).digest()
                           for k in keys)  # fmt: skip
        bits = np.frombuffer(digests, dtype=">u8").astype(np.uint64) >> np.uint64(11)
        return (bits.astype(np.float64) + 0.5) * 2.0**-53


def scores(data: str, name: str, cache: Path) -> Pool:
    """The stage's scores of one scenario, from the cache or from one run of the stage."""
    path = cache / f"{data}-{name}.parquet"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sage-rank-") as work:
            sc = prepare(data, name, Path(work))
            out = Path(work) / "run"
            sage_stream.run(sc.urls, model=sc.data.model, keep=0.1, checkpoint=sc.checkpoint,
                            out=str(out), device="cpu", progress=False)  # fmt: skip
            table = pq.read_table(out / "scores")
        table = table.filter(pc.equal(table["status"], "ok"))
        order = np.argsort([int(k) for k in table["__key__"].to_pylist()], kind="stable")
        table = table.take(pa.array(order))
        dups = list(find_duplicates(["all"], local_map(lambda _: table)))
        dup_keys = pa.concat_tables(dups)["__key__"] if dups else pa.array([], pa.string())
        table = table.append_column("dup", pc.is_in(table["__key__"], dup_keys))
        pq.write_table(table, path)
    table = pq.read_table(path)
    if "signature" not in table.column_names:  # a cache from before the class-mean rule
        path.unlink()
        return scores(data, name, cache)
    col = {c: table[c].cast(pa.float64()).to_numpy(zero_copy_only=False) for c in COLUMNS
           if c in table.column_names}  # fmt: skip
    return Pool(table, col, table["label"].to_numpy(), table["dup"].to_numpy())


def kept(table: pa.Table, values: np.ndarray, keep: float) -> np.ndarray:
    """Pool indices of the top of each class by proportional quotas (ties: key order)."""
    labels = table["label"].to_numpy()
    classes, counts = np.unique(labels, return_counts=True)
    quotas = proportional_quotas(dict(zip(classes.tolist(), counts.tolist(), strict=True)), keep)
    keys = np.array([int(k) for k in table["__key__"].to_pylist()])
    out = []
    for c, n in quotas.items():
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(keys[members], kind="stable")]
        out += keys[members[np.argsort(-values[members], kind="stable")[:n]]].tolist()
    return np.sort(np.array(out))


# --- building blocks of the rules ----------------------------------------------------------------


def per_class(pool: Pool, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """fn applied to each class's row indices; returns the (N,) array it fills."""
    out = np.zeros(len(pool.label))
    for c in np.unique(pool.label):
        members = np.flatnonzero(pool.label == c)
        out[members] = fn(members)
    return out


def otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of `values` over a histogram of `bins` and its effectiveness η (the
    between-class share of the variance: 2/π ≈ 0.64 for one normal mode, → 1 for two far
    apart)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi, 0.0
    h, edges = np.histogram(values, bins=bins, range=(lo, hi))
    mid = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(h)[:-1]
    w1 = len(values) - w0
    s0 = np.cumsum(h * mid)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] + h[-1] * mid[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2 / len(values) ** 2
    i = int(np.argmax(between))
    total = float(values.var())
    return float(edges[i + 1]), float(between[i] / total) if total else 0.0


def log_loss(pool: Pool) -> np.ndarray:
    return np.log(np.maximum(pool.col["loss"], 1e-12))


def mislabel_mask(
    pool: Pool, eta: float, max_share: float = 0.5, scope: str = "data"
) -> np.ndarray:
    """Rows set aside as likely mislabelled: log-loss above Otsu's threshold when the split is
    bimodal (η ≥ eta), found over all data ("data") or per class ("class"); per class at
    most `max_share` of the class (its highest losses), so no class goes whole."""
    ll = log_loss(pool)
    out = np.zeros(len(ll), dtype=bool)
    if scope == "data":
        t, e = otsu(ll)
        if e >= eta:
            out = ll > t
    for c in np.unique(pool.label):
        m = np.flatnonzero(pool.label == c)
        if scope == "class":
            t, e = otsu(ll[m])
            out[m] = (ll[m] > t) if e >= eta else False
        limit = int(np.floor(max_share * len(m)))
        if out[m].sum() > limit:
            worst = m[np.argsort(-ll[m], kind="stable")[:limit]]
            out[m] = False
            out[worst] = True
    return out


def cap_share(pool: Pool, aside: np.ndarray, max_share: float = 0.5) -> np.ndarray:
    """`aside` with at most `max_share` of each class (its highest losses) set aside."""
    out = aside.copy()
    for c in np.unique(pool.label):
        m = np.flatnonzero(pool.label == c)
        limit = int(np.floor(max_share * len(m)))
        if out[m].sum() > limit:
            worst = m[np.argsort(-pool.col["loss"][m], kind="stable")[:limit]]
            out[m] = False
            out[worst] = True
    return out


def strata_values(pool: Pool, signal: np.ndarray, seed: int, strata: int) -> np.ndarray:
    """CCS within each class: `strata` equal-width strata of `signal`; a row's value is
    −u·n_s (u uniform, n_s its stratum's count), so a quota takes about min(t, n_s) of each."""
    u = pool.uniform(seed)

    def one(m: np.ndarray) -> np.ndarray:
        s = signal[m]
        lo, hi = s.min(), s.max()
        k = (
            np.zeros(len(m), dtype=int)
            if hi <= lo
            else np.minimum(((s - lo) / (hi - lo) * strata).astype(int), strata - 1)
        )
        n = np.bincount(k, minlength=strata)
        return -u[m] * n[k]

    return per_class(pool, one)


def rank_of(pool: Pool, values: np.ndarray, aside: np.ndarray, dedup: bool) -> np.ndarray:
    """values into (2, 4), set-aside rows in (0, 1) by −loss, duplicates last of all."""
    squash = 3.0 + values / (1.0 + np.abs(values))
    loss = pool.col["loss"]
    out = np.where(aside, 0.5 - 0.5 * loss / (1.0 + loss), squash)
    return np.where(pool.dup, out - 10.0, out) if dedup else out


# --- the rules -----------------------------------------------------------------------------------

Rule = Callable[[Pool, float, int], np.ndarray]


def _default(pool: Pool, keep: float, seed: int) -> np.ndarray:
    """The stage's sage-coverage as it is now (docs/quality.md)."""
    return coverage.coverage_ranking(pool.table, np.ones(len(pool.label), bool), seed)


def _before(pool: Pool, keep: float, seed: int) -> np.ndarray:
    """The default before issue 28's third round (agreement and τ filter, leverage draw): the
    stage's rule for scores without signatures."""
    ok = np.ones(len(pool.label), bool)
    return coverage.coverage_ranking(pool.table.drop_columns(["signature"]), ok, seed)


def _random(pool: Pool, keep: float, seed: int) -> np.ndarray:
    return orderings.ranking_values(pool.table, "random", seed)


def _loss_easy(pool: Pool, keep: float, seed: int) -> np.ndarray:
    return -pool.col["loss"]


def _tau_aside(pool: Pool) -> np.ndarray:
    """The default before's filter: lowest 5% agreement per class, τ above its mean."""
    return _before(pool, 0.0, 0) < 2.0


def make(filter_: str, order: str, dedup: bool, eta: float = 0.75, strata: int = 10,
         small: float = 0.1) -> Rule:  # fmt: skip
    """A rule: a filter (none, tau: the default before's, otsu-data / otsu-class: the bimodal log-loss
    split), an order among the passing (random, easy: −loss, hard: loss, ccs-loss,
    ccs-score: strata of loss / agreement, budget: easy at keep ≤ `small`, ccs-loss above,
    draw: the default before's leverage draw), near-copies last or not."""

    def rule(pool: Pool, keep: float, seed: int) -> np.ndarray:
        if filter_ == "none":
            aside = np.zeros(len(pool.label), dtype=bool)
        elif filter_ == "tau":
            aside = _tau_aside(pool)
        elif filter_.startswith("loss"):  # the proxy does not fit the label: loss above T
            aside = cap_share(pool, pool.col["loss"] > float(filter_[4:]))
        else:
            aside = mislabel_mask(pool, eta, scope=filter_.split("-")[1])
        loss = log_loss(pool)
        if order == "random":
            v = pool.uniform(seed) * 2 - 1
        elif order == "easy":
            v = -loss
        elif order == "hard":
            v = loss
        elif order == "ccs-loss" or (order == "budget" and keep > small):
            v = strata_values(pool, np.where(aside, loss.min(), loss), seed, strata)
        elif order == "ccs-score":
            v = strata_values(pool, pool.col["score"], seed, strata)
        elif order == "budget":
            v = -loss
        elif order == "budget-draw":
            v = (
                _before(pool, keep, seed)
                if keep <= small
                else strata_values(pool, np.where(aside, loss.min(), loss), seed, strata)
            )
        elif order == "ccs-log":
            v = strata_values(pool, np.log(np.maximum(pool.col["loss"], 0) + 1e-4), seed, strata)
        elif order == "rb-hard":
            v = pool.uniform(seed) * 2 - 1 if keep <= small else loss
        elif order == "rb-ccs":
            v = (
                pool.uniform(seed) * 2 - 1
                if keep <= small
                else strata_values(pool, np.where(aside, loss.min(), loss), seed, strata)
            )
        elif order == "rb-ccslin":
            lin = np.where(aside, 0.0, np.maximum(pool.col["loss"], 0))
            v = (
                pool.uniform(seed) * 2 - 1
                if keep <= small
                else strata_values(pool, lin, seed, strata)
            )
        elif order == "ccs-lin":
            lin = np.where(aside, 0.0, np.maximum(pool.col["loss"], 0))
            v = strata_values(pool, lin, seed, strata)
        elif order == "budget-hard":
            v = -loss if keep <= small else loss
        elif order == "draw-hard":
            v = _before(pool, keep, seed) if keep <= small else loss
        elif order == "draw":
            v = _before(pool, keep, seed)
        else:
            raise ValueError(order)
        return rank_of(pool, v, aside, dedup)

    return rule


def auto(clean_order: str, threshold: float = 0.05, noisy_share: float = 0.25,
         strata: int = 10, small: float = 0.1, dedup: bool = True,
         floor: float = 1e-4) -> Rule:  # fmt: skip
    """Set aside the rows the proxy does not fit (loss > `threshold`; a class more than half of
    which is over is exempt). A pool with more than `noisy_share` of its rows set aside is
    noisy: easy first (−loss). Else `clean_order` among the passing: ccs-log (strata of
    log(loss + 1e-4) per class), draw (the default before's), random, draw-ccs (draw at keep ≤
    `small`, ccs-log above)."""

    def rule(pool: Pool, keep: float, seed: int) -> np.ndarray:
        loss = np.maximum(pool.col["loss"], 0.0)
        over = loss > threshold
        if over.mean() > noisy_share:
            return rank_of(pool, -loss, np.zeros(len(loss), bool), dedup)
        aside = over.copy()
        for c in np.unique(pool.label):
            m = pool.label == c
            if over[m].sum() > 0.5 * m.sum():
                aside[m] = False
        logl = np.log(loss + floor)
        if clean_order == "ccs-log" or (clean_order == "draw-ccs" and keep > small):
            v = strata_values(pool, np.where(aside, logl.min(), logl), seed, strata)
        elif clean_order == "ccs-score":
            v = strata_values(pool, np.where(aside, -1.0, pool.col["score"]), seed, strata)
        elif clean_order == "ccs-tau":
            t = np.log(np.maximum(pool.col["coverage"], 1e-12))
            v = strata_values(pool, np.where(aside, t.min(), t), seed, strata)
        elif clean_order in ("draw", "draw-ccs"):
            v = _before(pool, keep, seed)
        elif clean_order == "random":
            v = pool.uniform(seed) * 2 - 1
        else:
            raise ValueError(clean_order)
        return rank_of(pool, v, aside, dedup)

    return rule


def _stage_dedup(pool: Pool, keep: float, seed: int) -> np.ndarray:
    """The stage's sage-coverage with --dedup on: near-copies last."""
    return np.where(pool.dup, -10.0, _default(pool, keep, seed))


def class_means_with(before_filter: bool, draw: bool, quantile: float = 0.05) -> Rule:
    """The stage's class-mean filter (the default) combined with parts of the rule before it:
    `before_filter` also sets aside what the agreement filter (lowest `quantile` per class)
    and the τ cap set aside (with quantile 0: the τ cap only); `draw` draws the passing with
    the leverage weights (τ/‖g‖²)^(1/3) instead of uniformly. Set-aside rows go last, the
    class-mean ones by their class margin."""

    def rule(pool: Pool, keep: float, seed: int) -> np.ndarray:
        ok = np.ones(len(pool.label), bool)
        margin = coverage.row_filter(pool.table, ok).numbers["class_margin"]
        unsigned = pool.table.drop_columns(["signature"])
        before = coverage.coverage_ranking(unsigned, ok, seed, quantile=quantile,
                                           support=1.0 if before_filter else np.inf,
                                           temperature=coverage.TEMPERATURE if draw else np.inf)  # fmt: skip
        return np.where(margin < 0, before - 10.0 + margin, before)

    return rule


RULES: dict[str, Rule] = {
    "default": _default,
    "before": _before,
    "stage-dedup": _stage_dedup,
    "random": _random,
    "loss-easy": _loss_easy,
    "class-means/draw": class_means_with(False, True, quantile=0.0),
    "class-means+agreement/draw": class_means_with(False, True),
    "class-means/uniform": class_means_with(False, False, quantile=0.0),
    "class-means+tau/draw": class_means_with(True, True, quantile=0.0),
}


def rule_named(name: str) -> Rule:
    """A rule by name: one of RULES, or filter/order/dedup[/eta][/strata], e.g.
    otsu-data/budget/dedup/0.75/10."""
    if name in RULES:
        return RULES[name]
    if name.startswith("auto"):
        kind, order, *rest = name.split("/")
        kw = dict(
            zip(("threshold", "noisy_share", "strata", "floor"), map(float, rest), strict=False)
        )
        if "strata" in kw:
            kw["strata"] = int(kw["strata"])
        return auto(order, **kw, dedup=kind == "auto")
    f, o, d, *rest = name.split("/")
    kw: dict = {}
    if rest:
        kw["eta"] = float(rest[0])
    if len(rest) > 1:
        kw["strata"] = int(rest[1])
    return make(f, o, d == "dedup", **kw)


# --- the study ------------------------------------------------------------------------------------


def targets(scenario: str, keep: float, acc: dict[str, float], std_random: float,
            distinct: dict[str, float], rule: str) -> list[str]:  # fmt: skip
    """Issue 28's targets this cell checks for `rule`, each 'name ok' or 'name MISS'."""
    out = []
    ok = acc[rule] >= acc["random"] - min(std_random, 0.01)
    out.append(f"every {'ok' if ok else 'MISS'}")
    if scenario == "label-noise":
        others = [v for k, v in acc.items() if k in ("loss-easy", "default") and k != rule]
        if others:
            out.append(f"noise {'ok' if acc[rule] >= max(others) - 0.01 else 'MISS'}")
    if scenario == "near-copies" and keep >= 0.1:
        good = acc[rule] >= acc["random"] + 0.02
        good_d = distinct[rule] >= distinct["random"] + 0.10
        out.append(f"copies {'ok' if good else 'MISS'}/{'ok' if good_d else 'MISS'}")
    if scenario in ("clean", "long-tail") and keep == 0.3:
        out.append(f"k0.3 {'ok' if acc[rule] >= acc['random'] else 'MISS'}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="digits,control")
    p.add_argument("--scenarios", default=",".join(BUILDERS))
    p.add_argument("--keeps", default=",".join(str(k) for k in KEEPS))
    p.add_argument("--rules", default="default,random,loss-easy")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--output", type=Path, default=Path("/tmp/quality-rank.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rules = [r for r in args.rules.split(",") if r]
    for base in ("random", "default", "loss-easy"):
        if base not in rules:
            rules.insert(0, base)
    acc_cache_path = args.cache / "accuracy.json"
    acc_cache = json.loads(acc_cache_path.read_text()) if acc_cache_path.exists() else {}
    found: dict = {}
    for data in args.data.split(","):
        for name in args.scenarios.split(","):
            pool = scores(data, name, args.cache)
            sc = BUILDERS[name](DATASETS[data], KEEPS)
            for keep in [float(k) for k in args.keeps.split(",")]:
                rows: dict[str, dict] = {}
                for rule in rules:
                    started = time.monotonic()
                    subsets = [kept(pool.table, rule_named(rule)(pool, keep, s), keep)
                               for s in range(args.seeds)]  # fmt: skip
                    ck = (
                        f"{data}|{name}|{keep}|"
                        + hashlib.blake2b(
                            b"".join(s.tobytes() for s in subsets), digest_size=8
                        ).hexdigest()
                    )
                    if ck not in acc_cache:
                        acc_cache[ck] = cell(sc, subsets, list(range(args.seeds)))
                        acc_cache_path.write_text(json.dumps(acc_cache))
                    rows[rule] = {**acc_cache[ck], "seconds": time.monotonic() - started}
                acc = {r: v["accuracy"]["mean"] for r, v in rows.items()}
                dist = {r: v["distinct_share"]["mean"] for r, v in rows.items()}
                std_r = rows["random"]["accuracy"]["std"]
                for rule, v in rows.items():
                    met = " ".join(targets(name, keep, acc, std_r, dist, rule))
                    print(f"{data:>7} {name:>11} {keep:<4} {rule:<32} {acc[rule]:.3f} "
                          f"±{v['accuracy']['std']:.3f} {acc[rule] - acc['random']:+.3f} "
                          f"flip {v['flipped_share']['mean']:.1%} dist {dist[rule]:.0%} "
                          f"[{met}] {v['seconds']:.0f}s", flush=True)  # fmt: skip
                found[f"{data}/{name}/{keep}"] = rows
    record = {"command": " ".join(["python benchmarks/quality_rank.py", *(argv or sys.argv[1:])]),
              "seeds": args.seeds, "cells": found}  # fmt: skip
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
