"""Issue 7: SAGE on an accelerator with a ResNet-18-sized CNN, C = 100 (D = 51,300), ℓ = 256.

Measures, over the same 32×32 synthetic images in tar shards (`.npy` float32 CHW + `.cls`,
made here; nothing is downloaded) and the same reader: forward-only samples/s, pass 1
(sketch) and pass 2 (score) samples/s, the model alone on tensors already on the device (so
the reader's share is visible), pass 1 in params mode with a random projection, and
Frequent Directions update rows/s as ℓ and D grow. Writes
`results/gpu-<device name>.json` with `sketch_over_forward` = pass-1 / forward-only samples/s.

The whole measurement runs in one child process (cases.py `gpu`, which calls
`gpu_cases.measure`).

    python benchmarks/gpu.py --device cuda          # the figures for docs/benchmarks.md
    python benchmarks/gpu.py --device cpu --quick   # a tiny smoke run (narrow CNN, 64 images)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import Caps, parser, rate, run_case, start, work_dir, write_results
from data import npy_bytes
from gpu_cases import CLASSES, resnet

from sage_stream.formats.tar import TarShardWriter


def settings(quick: bool, device: str) -> dict[str, Any]:
    if quick:
        return {"width": 8, "n": 64, "per_shard": 32, "batch": 32, "ell": 32, "params_n": 32,
                "params": "fc.*", "project_dim": 64, "dims": [520, 2080], "ells": [16, 32],
                "ell_dim": 2080, "shrinks": 2, "model_only_s": 1.0}  # fmt: skip
    cuda = device.startswith("cuda")
    return {"width": 64, "n": 16384 if cuda else 512, "per_shard": 1024 if cuda else 256,
            "batch": 256 if cuda else 64, "ell": 256, "params_n": 2048 if cuda else 64,
            "params": "layer4.1.conv2.weight,fc.*", "project_dim": 512 if cuda else 128,
            "dims": [5130, 25650, 51300, 102600] if cuda else [5130, 51300],
            "ells": [64, 128, 256, 512, 1024] if cuda else [64, 256],
            "ell_dim": 51300, "shrinks": 8 if cuda else 2, "model_only_s": 3.0}  # fmt: skip


def write_image_shards(folder: Path, n: int, per_shard: int) -> list[str]:
    """Tar shards of 32×32 RGB images as float32 `.npy` (class-tinted noise) and `.cls`."""
    folder.mkdir(parents=True, exist_ok=True)
    tint = np.random.default_rng(1).random((CLASSES, 3, 1, 1), dtype=np.float32)
    paths = []
    for s in range(-(-n // per_shard)):
        size = min(per_shard, n - s * per_shard)
        path = folder / f"img-{s:06d}-{size}.tar"
        if not path.exists():
            rng = np.random.default_rng([2, s])
            y = rng.integers(0, CLASSES, size)
            x = 0.5 * tint[y] + 0.5 * rng.random((size, 3, 32, 32), dtype=np.float32)
            with open(path.with_suffix(".tmp"), "wb") as f, TarShardWriter(f) as writer:
                for i in range(size):
                    writer.write(f"i{s:06d}_{i:05d}", {"npy": npy_bytes(x[i]), "cls": b"%d" % y[i]})
            path.with_suffix(".tmp").rename(path)
        paths.append(str(path))
    return paths


def summarize(s: dict[str, Any], r: dict[str, Any], params_samples: int) -> dict[str, Any]:
    ph = r["phases"]
    names = ("forward", "sketch", "score", "sketch_bf16", "score_bf16")
    per_s = {name: rate(s["n"], ph[name]["wall_s"]) for name in names}
    per_s["sketch_params_projected"] = rate(params_samples, ph["sketch_params_projected"]["wall_s"])
    per_s["model_only_no_reader"] = round(r["model_only"], 1)
    return {
        "samples_per_s": per_s,
        "sketch_over_forward": round(per_s["sketch"] / per_s["forward"], 4),
        "score_over_forward": round(per_s["score"] / per_s["forward"], 4),
        "sketch_over_model_only": round(per_s["sketch"] / per_s["model_only_no_reader"], 4),
        "phases": ph,
        "sketch_stats": r["sketch_stats"],
        "fd": [{**f, "rows_per_s": rate(f["rows"], f["seconds"])} for f in r["fd"]],
    }


def device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    start(args)
    s = settings(args.quick, args.device)
    root = work_dir(args, "gpu")
    shards = write_image_shards(root / "shards", s["n"], s["per_shard"])
    params_shards = max(1, s["params_n"] // s["per_shard"])
    grid = [(d, s["ell"]) for d in s["dims"]] + [(s["ell_dim"], e) for e in s["ells"]]
    params = {**s, "device": args.device, "shards": shards, "out": str(root / "out"),
              "params_shards": params_shards, "grid": list(dict.fromkeys(grid))}  # fmt: skip
    caps = Caps(args.timeout or (300 if args.quick else 1800), args.mem_gib)
    result = run_case("gpu", params, caps, args.threads)
    body: dict[str, Any] = {"device_slug": device_slug(args.device), "settings": s}
    model = resnet(s["width"])
    body["model"] = {"parameters": sum(t.numel() for t in model.parameters()),
                     "classes": CLASSES, "grad_dim": CLASSES * (model.fc.in_features + 1)}  # fmt: skip
    body["status"] = result["status"]
    if result["status"] == "ok":
        params_samples = min(s["n"], params_shards * s["per_shard"])
        body.update(summarize(s, result, params_samples))
        print(body["samples_per_s"], "sketch_over_forward", body["sketch_over_forward"])
    else:
        body["detail"] = result.get("detail")
        print(result["status"], body["detail"])
    # issue 24's table (speed.py), in this process, so one call on a lent GPU records it all
    from speed import ROWS
    from speed import measure as speed_rows
    from speed import settings as speed_settings

    body["speed"] = speed_rows(speed_settings(args.quick), ROWS, root, args.device, args.threads)
    write_results(args, "gpu", body)


if __name__ == "__main__":
    main()
