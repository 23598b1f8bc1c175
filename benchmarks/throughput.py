"""Issue 5.2, throughput: pass 1 and pass 2 against a forward-only pass; emit against a byte
copy; Frequent Directions update rows/s as D and ℓ grow.

One child runs, over the same tar shards and the same reader, in this order: a forward-only
pass (decode, batch, model(x), nothing else), pass 1 (sketch), pass 2 (score), select (keep
everything), emit, and a plain byte copy of the shards. So `sketch_over_forward` (pass-1
samples/s over forward-only samples/s) is the sketch's cost, measured in one process. The same
child then times `FrequentDirections.update` on synthetic rows with a decaying spectrum.

    python benchmarks/throughput.py            # full: 16,000 samples; D up to 51,300
    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --device cuda
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from common import Caps, parser, rate, run_case, start, work_dir, write_results
from data import BlobSpec, proxy_checkpoint, write_blob_shards

PHASES = ["forward", "sketch", "score", "select", "emit", "raw_copy"]


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"n": 1200, "per_shard": 300, "dims": [256, 1024], "ells": [16, 32], "shrinks": 2}
    return {
        "n": 16000,
        "per_shard": 1000,
        "dims": [1024, 4096, 16384, 51300],  # 51,300 = C·(H+1) for C = 100, H = 512
        "ells": [64, 128, 256, 512],
        "shrinks": 4,
    }


def run(args, spec: BlobSpec, s: dict[str, Any], caps: Caps) -> dict[str, Any]:  # noqa: ANN001
    """One child: the passes over the shards, then the FD update rates."""
    root = work_dir(args, "throughput")
    params = {
        "spec": asdict(spec),
        "checkpoint": proxy_checkpoint(root, spec, quick=args.quick),
        "shards": write_blob_shards(root / "shards", spec, s["n"], s["per_shard"]),
        "out": str(root / "out"),
        "n": s["n"],
        "per_shard": s["per_shard"],
        "device": args.device,
        "keep": 1.0,
        "phases": PHASES,
        "fd": {"grid": fd_grid(s), "shrinks": s["shrinks"], "device": args.device},
    }
    return run_case("throughput", params, caps, args.threads)


def passes(s: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    ph = result["phases"]
    per_s = {name: rate(s["n"], ph[name]["wall_s"]) for name in PHASES}
    return {
        "status": "ok",
        "samples": s["n"],
        "shard_mib": round(result["bytes"] / 2**20, 2),
        "samples_per_s": per_s,
        "wall_s": {name: ph[name]["wall_s"] for name in PHASES},
        "sketch_over_forward": round(per_s["sketch"] / per_s["forward"], 4),
        "score_over_forward": round(per_s["score"] / per_s["forward"], 4),
        "emit_over_raw_copy": round(per_s["emit"] / per_s["raw_copy"], 4),
        "emitted": result["emit"],
    }


def fd_grid(s: dict[str, Any]) -> list[tuple[int, int]]:
    """D grows at ℓ = 256 (or the largest quick ℓ); ℓ grows at D = 4,096 (or the smallest)."""
    ell0 = 256 if 256 in s["ells"] else s["ells"][-1]
    dim0 = 4096 if 4096 in s["dims"] else s["dims"][0]
    grid = [(d, ell0) for d in s["dims"]] + [(dim0, e) for e in s["ells"]]
    return list(dict.fromkeys(grid))  # (dim0, ell0) once


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    start(args)
    spec, s = BlobSpec(), settings(args.quick)
    caps = Caps(args.timeout or (120 if args.quick else 1200), args.mem_gib)
    body: dict[str, Any] = {
        "spec": {**asdict(spec), "grad_dim": spec.grad_dim, "ell": 256, "batch_size": 256}
    }
    result = run(args, spec, s, caps)
    if result["status"] == "ok":
        body["passes"] = passes(s, result)
        rows = [{**r, "rows_per_s": rate(r["rows"], r["seconds"])} for r in result["fd"]]
        body["fd"] = {"status": "ok", "batch": 256, "rows": rows}
        print(body["passes"], *rows, sep="\n")
    else:
        failed = {"status": result["status"], "detail": result.get("detail")}
        body["passes"] = body["fd"] = failed
        print(failed)
    write_results(args, "throughput", body)


if __name__ == "__main__":
    main()
