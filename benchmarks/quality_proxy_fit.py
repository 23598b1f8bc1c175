"""How the default's choices hold with a less-fitted proxy (issue 28): `quality_rank.py` with the
data sets' proxies trained N full-batch steps instead of 300.

The benchmark's proxies nearly memorise their pool; a user's proxy rarely does. This reruns the
offline study with every proxy trained `--steps` steps (its own scores cache), for the rules
given, so that a rule tuned on near-memorising proxies can be checked on a weaker one:

    cd benchmarks && python quality_proxy_fit.py --steps 20
    cd benchmarks && python quality_proxy_fit.py --steps 20 --signals   # no training: the table

`--signals` trains nothing downstream: it prints, for each pool, what the stage's scores say
about label noise (the share of samples with a loss above 0.05, with a negative margin, with a
margin below minus the median positive margin, and the quartiles of log10 loss) and, in the
label-noise pools, how well each score column ranks the flipped samples (AUROC). It is the
check that a noisy-pool test made of these columns would need to pass: its statistic must
separate the label-noise pools from the others with a weak proxy and with a strong one alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
from pathlib import Path

import numpy as np
import quality_data

SIGNAL_COLUMNS = ("loss", "margin", "coverage", "grad_norm", "score", "energy")
HIGH_MEANS_FLIPPED = {"loss", "coverage", "grad_norm"}  # the others: low means flipped


def auroc(values: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a positive row ranks above a negative one (ties not split)."""
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable") + 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def signals(pool, scenario: quality_data.Scenario) -> dict[str, float]:
    """Pool-level noise statistics and, where labels were flipped, each column's AUROC."""
    keys = np.array([int(k) for k in pool.table["__key__"].to_pylist()])
    flipped = (scenario.y != scenario.y_clean)[keys]
    loss, margin = pool.col["loss"], pool.col["margin"]
    typical = float(np.median(margin[margin > 0]))  # how confidently the proxy fits
    q25, q50, q75 = np.quantile(np.log10(loss + 1e-6), [0.25, 0.5, 0.75])
    out = {
        "loss>0.05": float((loss > 0.05).mean()),
        "margin<0": float((margin < 0).mean()),
        "margin<-typical": float((margin < -typical).mean()),
        "typical margin": typical,
        "log10 loss q25/q50/q75": f"{q25:.2f}/{q50:.2f}/{q75:.2f}",
    }
    if flipped.any():
        for c in SIGNAL_COLUMNS:
            v = pool.col[c] if c in HIGH_MEANS_FLIPPED else -pool.col[c]
            out[f"AUROC {c}"] = auroc(v, flipped)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="the proxies' full-batch steps")
    p.add_argument("--data", default="digits,control")
    p.add_argument("--scenarios", default=",".join(quality_data.BUILDERS))
    p.add_argument("--rules", default="default,random,loss-easy")
    p.add_argument("--signals", action="store_true", help="print the noise statistics only")
    p.add_argument("--cache", type=Path, default=None)
    args = p.parse_args()
    for name, d in list(quality_data.DATASETS.items()):  # quality_rank reads this dict
        weaker = functools.partial(d.train_reproducible, steps=args.steps)
        quality_data.DATASETS[name] = dataclasses.replace(d, train_reproducible=weaker)
    import quality_rank  # after the swap: it imports DATASETS (the same dict)

    cache = args.cache or Path(tempfile.gettempdir()) / f"sage-proxy-fit-{args.steps}"
    if not args.signals:
        quality_rank.main(["--data", args.data, "--scenarios", args.scenarios, "--rules",
                           args.rules, "--cache", str(cache),
                           "--output", str(cache / "quality-rank.json")])  # fmt: skip
        return
    for data in args.data.split(","):
        for name in args.scenarios.split(","):
            pool = quality_rank.scores(data, name, cache)
            sc = quality_data.BUILDERS[name](quality_data.DATASETS[data], quality_data.KEEPS)
            found = signals(pool, sc)
            text = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in found.items())  # fmt: skip
            print(f"steps {args.steps} {data:>7} {name:>11}: {text}", flush=True)


if __name__ == "__main__":
    main()
