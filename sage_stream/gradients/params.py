"""`--grad params`: per-sample gradients of any chosen parameters, with `torch.func`.

Where it sits: one of the two gradient modes of featurizer.py. The gradient w.r.t. the
parameters chosen by glob (`--params`), by `functional_call` + `vmap(grad)` in chunks of
`chunk_size` samples to bound memory. A model that `vmap` cannot run is differentiated one
sample at a time instead (slower, same maths; a warning says so).
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from ..errors import InputError
from .featurizer import Featurizer, Inputs, _first_line, _rows, _unsqueeze, find_head

log = logging.getLogger("sage_stream")


class ParamsFeaturizer(Featurizer):
    """Per-sample gradients of the parameters matching `params` (None: every trainable one)."""

    mode = "params"

    def __init__(
        self, model: nn.Module, *, head: str | None = None, params: str | None = None,
        **options: Any,
    ):  # fmt: skip
        super().__init__(model, **options)
        self._init_params(head, params)
        self._project()

    def _init_params(self, head: str | None, params: str | None) -> None:
        if head is not None or any(isinstance(m, nn.Linear) for m in self.model.modules()):
            self.head_name, linear = find_head(self.model, head)
            self.num_classes = linear.out_features  # checked against the logits at every call
        self.param_names = _select_params(self.model, params)
        named = dict(self.model.named_parameters())
        self.raw_dim = sum(named[n].numel() for n in self.param_names)

    def _features(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.pseudo_labels and len(y):
            with torch.no_grad(), self._autocast(y):
                y = self.forward(x).float().argmax(dim=1)
        grads, loss, logits = self._params(x, y)
        return grads, loss, logits, y

    def _params(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(y) == 0:  # vmap cannot map over an empty batch
            zeros = torch.zeros((0, self.raw_dim), device=y.device)
            return zeros, zeros[:, 0], torch.zeros((0, self.num_classes or 0), device=y.device)
        if self.vmap_ok:
            try:
                return self._params_vmap(x, y)
            except (torch.cuda.OutOfMemoryError, InputError):
                raise
            except Exception as exc:  # noqa: BLE001 - torch.func refuses many models its way
                self.vmap_ok = False
                log.warning(
                    "--grad params: torch.func.vmap cannot run this model (%s: %s); per-sample "
                    "gradients are computed one sample at a time instead (slower)",
                    type(exc).__name__,
                    _first_line(exc),
                )
        try:
            return self._params_loop(x, y)
        except (torch.cuda.OutOfMemoryError, InputError):
            raise
        except Exception as exc:  # noqa: BLE001 - a model autograd cannot differentiate
            raise InputError(
                f"--grad params cannot differentiate this model per sample "
                f"({type(exc).__name__}: {_first_line(exc)}); use --grad last-layer"
            ) from None

    def _split_params(self) -> tuple[dict, dict, dict]:
        named = dict(self.model.named_parameters())
        chosen = {n: named[n].detach() for n in self.param_names}
        fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        return chosen, fixed, buffers

    def _params_vmap(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chosen, fixed, buffers = self._split_params()

        def loss_of_one(params: dict, xi: Inputs, yi: torch.Tensor) -> tuple:
            logits = self.forward(_unsqueeze(xi), (params, fixed, buffers))
            loss = F.cross_entropy(logits, yi.unsqueeze(0))
            return loss, (loss.detach(), logits.detach().squeeze(0))

        per_sample = vmap(
            grad(loss_of_one, has_aux=True), in_dims=(None, 0, 0), chunk_size=self.chunk_size
        )
        with self._autocast(y):
            g, (loss, logits) = per_sample(chosen, x, y)  # {name: (B, *shape)}, (B,), (B, C)
        self._check_width(logits)
        grads = torch.cat([g[n].flatten(1).to(torch.float32) for n in self.param_names], dim=1)
        return grads, loss.to(torch.float32), logits.to(torch.float32)

    def _params_loop(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same gradients as `_params_vmap`, by autograd one sample at a time."""
        chosen, fixed, buffers = self._split_params()
        rows, losses, all_logits = [], [], []
        for i in range(len(y)):
            params = {n: p.clone().requires_grad_(True) for n, p in chosen.items()}
            with torch.enable_grad(), self._autocast(y):
                logits = self.forward(_rows(x, i, i + 1), (params, fixed, buffers))
                self._check_width(logits)
                loss = F.cross_entropy(logits.float(), y[i : i + 1])
            names = self.param_names
            got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            flat = [
                (torch.zeros_like(params[n]) if gi is None else gi).flatten().to(torch.float32)
                for n, gi in zip(names, got, strict=True)
            ]
            rows.append(torch.cat(flat))
            losses.append(loss.detach().reshape(()))
            all_logits.append(logits.detach().float().squeeze(0))
        return torch.stack(rows), torch.stack(losses).float(), torch.stack(all_logits)


def _select_params(model: nn.Module, globs: str | None) -> list[str]:
    """Names of the parameters matching comma-separated globs (None: all trainable)."""
    named = list(model.named_parameters())
    if globs is None:
        return [n for n, p in named if p.requires_grad]
    patterns = [g.strip() for g in globs.split(",") if g.strip()]
    chosen = [n for n, _ in named if any(fnmatch.fnmatchcase(n, g) for g in patterns)]
    if not chosen:
        some = [n for n, _ in named[:20]]
        more = " ..." if len(named) > 20 else ""
        raise InputError(f"--params {globs!r} matches no parameter; the model has: {some}{more}")
    return chosen
