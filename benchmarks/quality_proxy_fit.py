"""How the default's choices hold with a less-fitted proxy (issue 28): `quality_rank.py` on the
digits with the proxy trained N full-batch steps instead of 300.

The benchmark's proxies nearly memorise their pool; a user's proxy rarely does. This reruns the
offline study with the digits proxy trained `--steps` steps (its own scores cache), for the
rules given, so that a rule tuned on near-memorising proxies can be checked on a weaker one:

    cd benchmarks && python quality_proxy_fit.py --steps 20 --scenarios clean,label-noise
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
from pathlib import Path

import quality_data

from sage_stream import demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="the proxy's full-batch steps")
    p.add_argument("--scenarios", default="clean,label-noise")
    p.add_argument("--rules", default="default,before,random,loss-easy")
    p.add_argument("--cache", type=Path, default=None)
    args = p.parse_args()
    digits = quality_data.DATASETS["digits"]
    quality_data.DATASETS["digits"] = dataclasses.replace(  # quality_rank reads this dict
        digits, train_reproducible=functools.partial(demo.train_reproducible, steps=args.steps)
    )
    import quality_rank  # after the swap: it imports DATASETS (the same dict)

    cache = args.cache or Path(tempfile.gettempdir()) / f"sage-proxy-fit-{args.steps}"
    quality_rank.main(["--data", "digits", "--scenarios", args.scenarios, "--rules", args.rules,
                       "--cache", str(cache), "--output", str(cache / "quality-rank.json")])  # fmt: skip


if __name__ == "__main__":
    main()
