"""Per-sample gradient features g_i of the cross-entropy loss, for a classifier on one batch.

Where it sits: decode → batch → **gradients** → (projection) → FD sketch / scores. Both passes
call the same `GradientFeaturizer`, so that pass 2 scores gradients in the space pass 1
sketched.

Two modes:
- `last-layer` (default): for a linear head W (C×H, + bias b) with input h_i, the per-sample
  gradient is the outer product e_i h_iᵀ (and e_i for b), e_i = softmax(logits_i) − onehot(y_i).
  One forward pass with a hook on the head, no autograd: ~30× faster than `vmap(grad)`.
- `params`: the gradient w.r.t. any parameters chosen by glob, with `torch.func`
  (`functional_call` + `vmap(grad)`), in chunks of `chunk_size` samples to bound memory.

The model may take a tensor or a dict of tensors (`model(**x)`, transformers-style) and return
logits as a tensor, tuple, dict or `ModelOutput` (`model.logits_of`). In params mode, a model
that `vmap` cannot run is differentiated one sample at a time instead (slower, same maths).

The model must already be in eval mode (the caller sets it): dropout or batch statistics would
make g_i depend on the rest of the batch. Non-finite values are passed through, not raised: the
scorer records them per sample.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import InputError
from .model import logits_of
from .projection import Projector


class InputShapeError(InputError):
    """The head gets an input of a shape it cannot take (not (B, H)).

    Raised per batch: the passes make it an error row for each sample of the batch, so one
    shard of another shape does not stop the run (if every batch is so, the run's early stop
    on a failing start names it).
    """


log = logging.getLogger("sage_stream")
Inputs = torch.Tensor | dict[str, torch.Tensor]  # as batches.Inputs

MODES = ("last-layer", "params")
# --precision: the dtype the model's forward runs in under autocast. Gradient features, the
# loss and everything after them are computed in float32 (or better) whatever this is.
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}  # fmt: skip


@dataclass
class Features:
    grads: torch.Tensor  # (B, D) float32, D = GradientFeaturizer.dim
    loss: torch.Tensor  # (B,) float32 per-sample cross-entropy
    logits: torch.Tensor  # (B, C) float32
    labels: torch.Tensor  # (B,) int64: the labels the gradients are of (predicted ones too)


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The linear head: the module called `name`, else the last `nn.Linear` in the model."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if name is None:
        if not linears:
            raise InputError("the model has no nn.Linear head; use --grad params")
        return linears[-1], cast(nn.Linear, model.get_submodule(linears[-1]))
    modules = dict(model.named_modules())
    if not isinstance(modules.get(name), nn.Linear):
        what = "is not an nn.Linear" if name in modules else "is not a module of the model"
        raise InputError(f"head {name!r} {what}; the model's nn.Linear modules are: {linears}")
    return name, modules[name]


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


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{name} must be a positive integer, got {value!r}")


class GradientFeaturizer:
    """Maps a batch (x, y) to per-sample gradient features, see the module docstring.

    Attributes: `mode`; `head_name` (last-layer mode, and in params mode the Linear that gave
    `num_classes`, else None); `param_names` (the parameters whose gradients make up g, in
    layout order); `num_classes` (C: the head's out_features; in params mode with no Linear,
    None until the first call, then the logits' width); `raw_dim` (D); `dim` (D after
    projection).

    `params` (params mode) is comma-separated fnmatch globs over `named_parameters()` names,
    frozen parameters included when a glob names them; None means every trainable parameter.
    With `project_dim` the (raw_dim, project_dim) float32 projection lives on the model's
    device: raw_dim·project_dim·4 bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str = "last-layer",
        head: str | None = None,
        params: str | None = None,
        project_dim: int | None = None,
        seed: int = 0,
        chunk_size: int = 64,
        precision: str = "fp32",
        output_key: str | None = None,
        pseudo_labels: bool = False,
    ):
        if mode not in MODES:
            raise InputError(f"gradient mode {mode!r} is not one of {list(MODES)}")
        _positive_int("chunk_size", chunk_size)
        _positive_int("project_dim", project_dim)
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
        self.model, self.mode, self.chunk_size = model, mode, chunk_size
        self.output_key = output_key
        self.pseudo_labels = pseudo_labels  # --label-key predicted: y = the model's argmax
        self.vmap_ok = True  # params mode: False once vmap failed on this model (then a loop)
        self.autocast = PRECISIONS[precision]  # None: the model's own dtype
        self.head_name: str | None = None
        self.head: nn.Linear | None = None
        self.num_classes: int | None = None
        if mode == "last-layer":
            self._init_last_layer(head)
        else:
            self._init_params(head, params)
        self.projector = None
        if project_dim is not None:
            self.projector = Projector(self.raw_dim, project_dim, seed, _model_device(model))
        self.dim = project_dim if project_dim is not None else self.raw_dim

    def _init_last_layer(self, head: str | None) -> None:
        self.head_name, self.head = find_head(self.model, head)
        prefix = f"{self.head_name}." if self.head_name else ""  # "" when the model is the head
        bias = self.head.bias is not None
        self.param_names = [prefix + "weight"] + [prefix + "bias"] * bias
        self.num_classes = self.head.out_features
        self.raw_dim = self.num_classes * (self.head.in_features + bias)  # C·(H+1) or C·H

    def _init_params(self, head: str | None, params: str | None) -> None:
        if head is not None or any(isinstance(m, nn.Linear) for m in self.model.modules()):
            self.head_name, linear = find_head(self.model, head)
            self.num_classes = linear.out_features  # checked against the logits at every call
        self.param_names = _select_params(self.model, params)
        named = dict(self.model.named_parameters())
        self.raw_dim = sum(named[n].numel() for n in self.param_names)

    def forward(self, x: Inputs, params: Any = None) -> torch.Tensor:
        """The model's logits for inputs `x` (a tensor, or a dict passed as keywords), with
        `params` (name -> tensor, for torch.func) in place of the model's own if given."""
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
        if params is None:
            out = self.model(*args, **kwargs)
        else:
            out = functional_call(self.model, params, args, kwargs)
        return cast(torch.Tensor, logits_of(out, self.output_key))

    def __call__(self, x: Inputs, y: torch.Tensor) -> Features:
        """Features of a batch: x on the model's device, y (B,) int64 labels in [0, C)."""
        if self.num_classes is None:  # params mode, no Linear: learn C from one sample
            with torch.no_grad(), self._autocast(y):
                self._check_width(self.forward(_rows(x, 0, 1)).float())
        y = self._check_labels(x, y)
        if self.mode == "last-layer":
            grads, loss, logits, y = self._last_layer(x, y)
        else:
            if self.pseudo_labels and len(y):
                with torch.no_grad(), self._autocast(y):
                    y = self.forward(x).float().argmax(dim=1)
            grads, loss, logits = self._params(x, y)
        if self.projector is not None:
            grads = self.projector(grads)  # (B, k)
        return Features(grads=grads, loss=loss, logits=logits, labels=y)

    def _check_labels(self, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InputError(
                f"labels must be a (B,) integer tensor, got {y.dtype} {tuple(y.shape)}"
            )
        if isinstance(x, torch.Tensor) and x.shape[:1] != y.shape:
            raise InputError(f"batch of {x.shape[0]} inputs but {y.shape[0]} labels")
        if y.numel() and self.num_classes is not None:
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise InputError(
                    f"label {low if low < 0 else high} is outside [0, {self.num_classes})"
                )
        return y.to(torch.int64)

    def _last_layer(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        head = self.head
        if head is None:  # set by _init_last_layer, the only mode that calls this
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

    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        # `x` only says the device: the labels' (a dict of inputs has no single one)
        """The forward under autocast to `precision`, or as it is for fp32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast)

    def _check_width(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"the model must return a (B, C) tensor of logits, got {got}")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
        elif logits.shape[1] != self.num_classes:
            raise InputError(
                f"the model returns {logits.shape[1]} logits but {self.head_name!r} has "
                f"{self.num_classes} outputs; pass --head NAME for the layer giving the logits"
            )


def _rows(x: Inputs, start: int, stop: int) -> Inputs:
    """Samples [start, stop) of a batch, tensor or dict."""
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def _unsqueeze(x: Any) -> Any:
    return {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
