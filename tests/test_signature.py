"""Pass 2's selection columns (signature.py) against direct computations."""

from __future__ import annotations

import torch

from sage_stream.gradients.projection import projection_matrix
from sage_stream.signature import SIGNATURE_DIM, SIGNATURE_SEED, copy_signature, label_margin


def test_margin_is_the_label_logit_minus_the_largest_other():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 3.5], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    expected = [2.0 - 1.0, 3.0 - 3.5, 0.0 - 1.0]
    assert label_margin(logits, labels).tolist() == expected


def test_signature_is_the_fixed_projection_of_the_head_input():
    h = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    p = projection_matrix(7, SIGNATURE_DIM, SIGNATURE_SEED)
    got = copy_signature(h)
    assert got.shape == (5, SIGNATURE_DIM)
    torch.testing.assert_close(got, h @ p)
    torch.testing.assert_close(copy_signature(h[2:3]), got[2:3])  # a row alone: the same
