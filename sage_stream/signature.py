"""What pass 2 records for selection besides the scores: a near-copy signature and the margin.

Where it sits: gradients → **signature** → scores/part-<shard>.parquet (columns `signature`
and `margin`) → select (select/dedup.py finds near-copies by the signature; select/coverage.py
sets aside samples whose signature is nearer another class's mean than their own,
select/classmeans.py).

- `signature` (32 float32 numbers): a seeded ±1/√32 random projection of h, the input of the
  classifier's head (last-layer mode; null in params mode). Near-copies were found best in h
  (benchmarks/dedup_study.py: precision and recall 1.000 on both data sets of the quality
  benchmark at the documented threshold, against far lower in the gradient g or the sketch
  coordinates z, where the softmax residual mixes in). 32 numbers keep distances to a few per
  cent (Johnson–Lindenstrauss) at 128 bytes a sample. The matrix is the hash-made one of
  projection.py under its own fixed seed, so every worker and device gets the same numbers.
- `margin`: the logit of the sample's label minus the largest other logit; below 0 the proxy
  predicts another class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gradients.projection import projection_matrix

SIGNATURE_DIM = 32
SIGNATURE_SEED = 0x51A7  # fixed: a signature must not depend on the run's --seed
_matrices: dict[tuple[int, str], Tensor] = {}


def copy_signature(head_input: Tensor) -> Tensor:
    """h (B, H) -> h P (B, 32) float32, P the fixed (H, 32) ±1/√32 projection."""
    h = head_input.to(torch.float32)
    key = (h.shape[1], str(h.device))
    if key not in _matrices:
        _matrices[key] = projection_matrix(h.shape[1], SIGNATURE_DIM, SIGNATURE_SEED,
                                           device=h.device)  # fmt: skip
    return h @ _matrices[key]  # (B, 32)


def label_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """logit of the label minus the largest other logit: (B, C), (B,) -> (B,) float64."""
    z = logits.to(torch.float64)
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), float("-inf"))
    return own - others.max(dim=1).values
