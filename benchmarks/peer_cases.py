"""The peers, one child-process case each, on the same shards, model and keep fraction as SAGE.

Where it sits: `peers.py` runs these through `common.run_case`; `cases.py` dispatches to them.
Each peer first loads the data set into memory through sage-stream's own reader and decoder
(phase "load": what a user of an in-memory tool must do), then selects (phase "select"):

- `hand_svd`: what a user writes by hand: stack every per-sample last-layer gradient (N×D),
  take an exact SVD, keep the top ℓ directions, then score and select exactly as SAGE does.
  Its kept set is the reference that FD approximates.
- `craig`, `gradmatch`: CORDS 0.0.4 strategies (PerClass) over the same last-layer gradients,
  run as published. CORDS's `selectionstrategies.SL/__init__` imports SELCON, whose dataset
  code needs torchvision; only the two strategy modules are loaded (see `_cords`).
- `trak`: TRAK (traker 0.3.2) random-projection features of the same last layer, scored
  against held-out target samples; each training sample ranks by its mean attribution.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from data import BlobSpec, blob_chunk
from sage_cases import Phases, blob_model, sage_options, save_selection
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sage_stream.config import make_config
from sage_stream.gradients.featurizer import GradientFeaturizer
from sage_stream.passes.loop import build_context, shard_batches
from sage_stream.scores import agreement, consensus_directions, sketch_coordinates
from sage_stream.select.reference import select

log = logging.getLogger("benchmarks.peers")


def load_arrays(p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of the shards, decoded by sage-stream: x (N, dim) float32, y (N,) int64."""
    ctx = build_context(make_config(inputs=p["shards"], **sage_options(p)))
    xs, ys = [], []
    for ref in ctx.refs:
        for item in shard_batches(ctx, ref):
            xs.append(item.x)
            ys.append(item.y)
    return torch.cat(xs), torch.cat(ys)


def _budget(p: dict[str, Any], n: int) -> int:
    return round(p["keep"] * n)


def _select_by_value(value: np.ndarray, y: torch.Tensor, keep: float) -> np.ndarray:
    """The kept positions by SAGE's own selection rule (proportional class quotas)."""
    n = len(value)
    table = pa.table(
        {
            "__key__": [f"{i:09d}" for i in range(n)],
            "__shard__": ["all"] * n,
            "label": y.numpy(),
            "status": ["ok"] * n,
            "score": value.astype(np.float64),
            "loss": np.zeros(n),
            "grad_norm": np.zeros(n),
        }
    )
    chosen = select(table, keep=keep, balance="proportional")
    return np.array([int(k) for k in chosen["__key__"].to_pylist()], dtype=np.int64)


def _device(p: dict[str, Any]) -> str:
    return p.get("device", "cpu")


def case_hand_svd(p: dict[str, Any]) -> dict[str, Any]:
    device, ell = _device(p), p.get("ell", 256)
    model, phase = blob_model(p).to(device), Phases(device)
    featurizer = GradientFeaturizer(model)
    with phase("load"):
        x, y = load_arrays(p)
    with phase("select"):
        x, y = x.to(device), y.to(device)
        grads = torch.cat(
            [featurizer(xb, yb).grads for xb, yb in zip(x.split(256), y.split(256), strict=True)]
        )  # (N, D): every per-sample gradient at once
        _, s, vh = torch.linalg.svd(grads, full_matrices=False)  # exact
        sigma, basis = s[:ell], vh[:ell]  # (ℓ,), (ℓ, D)
        sums = torch.zeros(featurizer.num_classes, grads.shape[1], dtype=torch.float64)
        sums = sums.to(device).index_add_(0, y, grads.double())  # (C, D)
        z, _ = sketch_coordinates(grads, sigma, basis)  # (N, ℓ)
        value = agreement(z, y, consensus_directions(sigma, basis, sums)).cpu().numpy()
        y = y.cpu()
        idx = _select_by_value(value, y, p["keep"])
    if p.get("save"):
        save_selection(p["save"], idx)
    return {**phase.summary(), "samples": len(y), "kept": len(idx)}


def _cords() -> types.SimpleNamespace:
    """CRAIG and GradMatch without running `cords.selectionstrategies.SL/__init__.py`.

    That __init__ also imports SELCON, whose dataset module imports torchvision; PyPI's
    torchvision wheels do not load against the CPU torch used here. The two strategy modules
    themselves need only torch, numpy, scipy and apricot.
    """
    strategies = importlib.import_module("cords.selectionstrategies")
    name = "cords.selectionstrategies.SL"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(strategies.__file__).parent / "SL")]
        sys.modules[name] = package
    craig = importlib.import_module(name + ".craigstrategy")
    gradmatch = importlib.import_module(name + ".gradmatchstrategy")
    return types.SimpleNamespace(CRAIG=craig.CRAIGStrategy, GradMatch=gradmatch.GradMatchStrategy)


class _Messages(logging.Handler):
    """Keeps what the CORDS strategies log (GradMatch says how many points it filled at random)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _cords_case(p: dict[str, Any], build) -> dict[str, Any]:  # noqa: ANN001
    model, phase = blob_model(p).to(_device(p)), Phases(_device(p))
    strategies = _cords()
    messages = _Messages()
    log.addHandler(messages)
    log.setLevel(logging.DEBUG)
    with phase("load"):
        x, y = load_arrays(p)
    with phase("select"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CORDS asks for pin_memory on the CPU
        loader = DataLoader(TensorDataset(x, y), batch_size=p.get("batch_size", 128))
        strategy = build(strategies, loader, model, int(y.max()) + 1, _device(p))
        idx, gammas = strategy.select(_budget(p, len(y)), model.state_dict())
    idx = np.asarray([int(i) for i in idx], dtype=np.int64)
    if p.get("save"):
        save_selection(p["save"], idx, np.asarray(gammas, dtype=np.float64))
    found = {**phase.summary(), "samples": len(y), "kept": len(idx)}
    return {**found, "log": [m for m in messages.lines if "Random points added" in m]}


def case_craig(p: dict[str, Any]) -> dict[str, Any]:
    def build(s, loader, model, classes, device):  # noqa: ANN001, ANN202
        loss = nn.CrossEntropyLoss(reduction="none")
        return s.CRAIG(loader, loader, model, loss, device, classes, True, False, "PerClass", log)

    return _cords_case(p, build)


def case_gradmatch(p: dict[str, Any]) -> dict[str, Any]:
    def build(s, loader, model, classes, device):  # noqa: ANN001, ANN202
        loss = nn.CrossEntropyLoss(reduction="none")
        return s.GradMatch(
            loader, loader, model, loss, 0.01, device, classes, True, "PerClass", log,
            valid=False, v1=True, lam=0, eps=1e-100,
        )  # fmt: skip

    return _cords_case(p, build)


def case_trak(p: dict[str, Any]) -> dict[str, Any]:
    from trak import TRAKer

    device = _device(p)
    model, phase = blob_model(p).to(device), Phases(device)
    xt, _, yt = blob_chunk(BlobSpec(**p["spec"]), 10**6, p["targets"])  # held out, noisy
    with phase("load"):
        x, y = load_arrays(p)
    with phase("select"), tempfile.TemporaryDirectory(dir=p["out"]) as save_dir:
        traker = TRAKer(
            model=model, task="image_classification", train_set_size=len(y),
            save_dir=save_dir, device=device, proj_dim=p["proj_dim"],
            grad_wrt=["fc.weight", "fc.bias"], use_half_precision=False,
            logging_level=logging.ERROR,
        )  # fmt: skip
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for xb, yb in zip(x.split(256), y.split(256), strict=True):
            traker.featurize(batch=(xb.to(device), yb.to(device)), num_samples=len(yb))
        traker.finalize_features()
        traker.start_scoring_checkpoint("targets", model.state_dict(), 0, len(yt))
        for xb, yb in zip(
            torch.from_numpy(xt).split(256), torch.from_numpy(yt).split(256), strict=True
        ):
            traker.score(batch=(xb.to(device), yb.to(device)), num_samples=len(yb))
        scores = np.asarray(traker.finalize_scores("targets"))  # (N, targets)
        value = scores.astype(np.float64).mean(axis=1)
        idx = _select_by_value(value, y, p["keep"])
    if p.get("save"):
        save_selection(p["save"], idx)
    return {**phase.summary(), "samples": len(y), "kept": len(idx)}


PEERS = {
    "hand_svd": case_hand_svd,
    "craig": case_craig,
    "gradmatch": case_gradmatch,
    "trak": case_trak,
}
