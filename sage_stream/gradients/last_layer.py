"""`--grad last-layer` (default): the closed form of a linear head's per-sample gradient.

Where it sits: one of the two gradient modes of featurizer.py. For a linear head W (C×H,
+ bias b) with input h_i, the per-sample gradient of the cross-entropy is the outer product
e_i h_iᵀ (and e_i for b), e_i = softmax(logits_i) − onehot(y_i): one forward pass with a hook on
the head, no autograd, ~30× faster than `vmap(grad)`. D = C·(H+1), or C·H without a bias.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .featurizer import Featurizer, Inputs, InputShapeError, find_head


class LastLayerFeaturizer(Featurizer):
    """Per-sample gradients of the head `head` (default: the last nn.Linear)."""

    mode = "last-layer"

    def __init__(self, model: nn.Module, *, head: str | None = None, **options: Any):
        super().__init__(model, **options)
        self._init_last_layer(head)
        self._project()

    def _init_last_layer(self, head: str | None) -> None:
        self.head_name, self.head = find_head(self.model, head)
        prefix = f"{self.head_name}." if self.head_name else ""  # "" when the model is the head
        bias = self.head.bias is not None
        self.param_names = [prefix + "weight"] + [prefix + "bias"] * bias
        self.num_classes = self.head.out_features
        self.raw_dim = self.num_classes * (self.head.in_features + bias)  # C·(H+1) or C·H

    def _features(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._last_layer(x, y)

    def _last_layer(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        head = self.head
        if head is None:  # set by _init_last_layer
            raise RuntimeError("last-layer features without a head")

        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen.append((inputs[0], output, output._version))

        handle = head.register_forward_hook(hook)
        try:
            with torch.no_grad(), self._autocast(y):
                out = self.forward(x)
        finally:
            handle.remove()
        h, logits = self._head_io(seen, out)  # (B, H), (B, C)
        return self._closed_form(h, logits, y)

    def _closed_form(
        self, h: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Gradients, loss, logits and labels from the head's input and output: the forward's
        own, or those pass 1 kept (`Featurizer.replay`), which give the same bits."""
        head = self.head
        if head is None:  # set by _init_last_layer
            raise RuntimeError("last-layer features without a head")
        if self.pseudo_labels:
            y = logits.detach().float().argmax(dim=1)
        with torch.no_grad():
            work = torch.promote_types(logits.dtype, torch.float32)  # at least float32
            logits, h = logits.to(work), h.to(work)
            e = torch.softmax(logits, dim=1)  # (B, C)
            e[torch.arange(len(y), device=y.device), y] -= 1
            gw = e[:, :, None] * h[:, None, :]  # (B, C, H), W's row-major layout
            parts = [gw.flatten(1)] + [e] * (head.bias is not None)
            grads = torch.cat(parts, dim=1)  # (B, C·H [+ C])
            loss = F.cross_entropy(logits, y, reduction="none")  # (B,)
        f32 = torch.float32
        # (B, H): pass 2's near-copy signature (signature.py); contiguous, as a replayed one is
        self.head_input = h.to(f32).contiguous()
        # h and the logits in float32 are exactly what this computed from: pass 1 may keep them
        self.replayable = work == f32
        return grads.to(f32), loss.to(f32), logits.to(f32), y

    def _head_io(self, seen: list, out: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input and output, checked to be (B, H) and exactly the model's output."""
        where = f"head {self.head_name!r}"
        if len(seen) != 1:
            raise InputError(
                f"{where} ran {len(seen)} times in one forward pass; use --grad params"
            )
        h, head_out, version = seen[0]
        same = (
            isinstance(out, torch.Tensor)
            and out.shape == head_out.shape
            and out.dtype == head_out.dtype
            and out.stride() == head_out.stride()
            and out.data_ptr() == head_out.data_ptr()
            and out._version == version  # no in-place op after the head
        )
        if not same:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(
                f"the logits the model returns ({got}) are not what {where} returned "
                f"({tuple(head_out.shape)}): an operation follows it (softmax, scaling, an "
                "in-place change), or another layer gives the logits; pass --head NAME for "
                "that layer, --output-key KEY if the logits are another entry of the output, "
                "or --grad params"
            )
        if h.ndim != 2:
            raise InputShapeError(
                f"{where} gets input of shape {tuple(h.shape)}, not (B, H) (if every input "
                "is so, use --grad params)"
            )
        return h, cast(torch.Tensor, out)
