"""Train a model on the samples a sage-stream run kept: the last step after the stage.

The feed (`sage_stream.feed.SelectedDataset`) streams the kept samples, either from the
emitted shards or from the original shards filtered by `selection.parquet` (`--original`), into
a plain DataLoader; its workers split the shards between them. On CUDA the batches come through
pinned memory and the forward pass runs under `torch.autocast` (bfloat16 where supported, else
float16 with a gradient scaler).

    sage-stream demo                                          # writes sage-demo/run
    python examples/train_on_selection.py sage-demo/run       # trains digits_mlp on the kept half
    python examples/train_on_selection.py OUT --original --model mymodels:net --epochs 5

On the demo's output it ends with the accuracy on the clean held-out digits.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from sage_stream.decode.decoder import load_callable
from sage_stream.feed import SelectedDataset

DEMO_MODEL = "sage_stream.demo:digits_mlp"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="the run's output folder or URL (OUT)")
    p.add_argument("--original", action="store_true", help="read the input shards + selection")
    p.add_argument("--inputs", nargs="+", help="input shards, if not those in OUT/manifest.json")
    p.add_argument("--model", default=DEMO_MODEL, help=f"MOD:FN factory (default {DEMO_MODEL})")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 suits tiny models)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the shard order every epoch")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on CUDA (bfloat16 where the GPU has it), None (full precision) else."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_loader(args: argparse.Namespace, device: torch.device) -> DataLoader:
    dataset = SelectedDataset(
        args.out,
        original=args.original,
        inputs=args.inputs,
        shuffle=not args.no_shuffle,
        seed=args.seed,
    )
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # workers must see each epoch's set_epoch
    )


def train(model: nn.Module, loader: DataLoader, args: argparse.Namespace, device: torch.device):
    """Epochs over the feed; returns (steps, samples seen, mean loss of the last epoch)."""
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = seen = 0
    last = float("nan")
    for epoch in range(args.epochs):
        loader.dataset.set_epoch(epoch)
        total, count = 0.0, 0
        for x, y, _score in loader:  # x (B, ...) float32, y (B,) int64, score (B,) float64
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            steps, seen = steps + 1, seen + len(y)
            total, count = total + loss.item() * len(y), count + len(y)
            if args.max_steps is not None and steps >= args.max_steps:
                return steps, seen, total / count
        last = total / max(count, 1)
    return steps, seen, last


def demo_accuracy(model: nn.Module, device: torch.device) -> float:
    """Accuracy on the demo's held-out digits, whose labels were never flipped."""
    from sage_stream.demo import TEST_SIZE, load_digits_data

    x, y = load_digits_data()
    x_test, y_test = torch.from_numpy(x[-TEST_SIZE:]).to(device), torch.from_numpy(y[-TEST_SIZE:])
    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(1).cpu()
    return float((predicted == y_test).float().mean())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    loader = make_loader(args, device)
    model = load_callable(args.model)().to(device)
    start = time.monotonic()
    steps, seen, loss = train(model, loader, args, device)
    result: dict[str, Any] = {
        "device": str(device),
        "amp": str(amp_dtype(device)).removeprefix("torch.") if device.type == "cuda" else "off",
        "kept_samples": loader.dataset.num_samples,
        "steps": steps,
        "samples_seen": seen,
        "last_epoch_loss": loss,
        "seconds": round(time.monotonic() - start, 2),
    }
    if args.model == DEMO_MODEL and loader.dataset.plan.config.get("model") == DEMO_MODEL:
        result["heldout_accuracy"] = demo_accuracy(model, device)
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    return result


if __name__ == "__main__":
    main()
