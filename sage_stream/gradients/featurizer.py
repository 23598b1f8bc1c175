"""Per-sample gradient features g_i of the cross-entropy loss, for a classifier on one batch.

Where it sits: decode → batch → **gradients** → (projection) → FD sketch / scores. Both passes
call the same `GradientFeaturizer`, so that pass 2 scores gradients in the space pass 1
sketched. This module holds what both modes share (`Featurizer`: the forward, the label and
logit checks, autocast, the projection); each mode is a subclass in its own module.

Two modes:
- `last-layer` (default, last_layer.py): for a linear head W (C×H, + bias b) with input h_i, the per-sample
  gradient is the outer product e_i h_iᵀ (and e_i for b), e_i = softmax(logits_i) − onehot(y_i).
  One forward pass with a hook on the head, no autograd: ~30× faster than `vmap(grad)`.
- `params` (params.py): the gradient w.r.t. any parameters chosen by glob, with `torch.func`
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
import logging
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from ..decode.batches import Inputs
from ..errors import InputError, positive_int
from .model import logits_of
from .projection import Projector


class InputShapeError(InputError):
    """The head gets an input of a shape it cannot take (not (B, H)).

    Raised per batch: the passes make it an error row for each sample of the batch, so one
    shard of another shape does not stop the run (if every batch is so, the run's early stop
    on a failing start names it).
    """


log = logging.getLogger("sage_stream")

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
    head_input: torch.Tensor | None = None  # (B, H) float32 h, last-layer mode only (near-copies)


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


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


class Featurizer:
    """Maps a batch (x, y) to per-sample gradient features, see the module docstring; the
    modes are its subclasses (last_layer.py, params.py), made by `GradientFeaturizer`.

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

    mode: str
    raw_dim: int
    param_names: list[str]

    def __init__(
        self,
        model: nn.Module,
        *,
        project_dim: int | None = None,
        seed: int = 0,
        chunk_size: int = 64,
        precision: str = "fp32",
        output_key: str | None = None,
        pseudo_labels: bool = False,
    ):
        for name, value in (("chunk_size", chunk_size), ("project_dim", project_dim)):
            if value is not None:
                positive_int(value, name)
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
        self.model, self.chunk_size = model, chunk_size
        self._projection = (project_dim, seed)  # made by _project once D is known
        self.output_key = output_key
        self.pseudo_labels = pseudo_labels  # --label-key predicted: y = the model's argmax
        self.vmap_ok = True  # params mode: False once vmap failed on this model (then a loop)
        self.autocast = PRECISIONS[precision]  # None: the model's own dtype
        self.head_name: str | None = None
        self.head: nn.Linear | None = None
        self.head_input: torch.Tensor | None = None  # (B, H) of the last batch, last-layer mode
        self.num_classes: int | None = None
        # the last batch's features follow in closed form from its head input and logits in
        # float32 (`replay`): last-layer mode with a float32 (or lower) head
        self.replayable = False

    def _project(self) -> None:
        """Once the mode knows D (raw_dim): the optional projection to project_dim."""
        project_dim, seed = self._projection
        self.projector = None
        if project_dim is not None:
            self.projector = Projector(self.raw_dim, project_dim, seed, _model_device(self.model))
        self.dim = project_dim if project_dim is not None else self.raw_dim

    def forward(self, x: Inputs, params: Any = None) -> torch.Tensor:
        """The model's logits for inputs `x` (a tensor, or a dict passed as keywords), with
        `params` (name -> tensor, for torch.func) in place of the model's own if given."""
        args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
        if params is None:
            out = self.model(*args, **kwargs)
        else:
            out = functional_call(self.model, params, args, kwargs)
        return cast(torch.Tensor, logits_of(out, self.output_key))

    def __call__(self, x: Inputs, y: torch.Tensor, *, labels_checked: bool = False) -> Features:
        """Features of a batch: x on the model's device, y (B,) int64 labels in [0, C).

        `labels_checked`: the caller has checked the labels' range on the host (the shard
        loop's decode step does), so it is not checked again on the device, which would
        wait for the device (a host sync per batch on CUDA)."""
        if self.num_classes is None:  # params mode, no Linear: learn C from one sample
            with torch.no_grad(), self._autocast(y):
                self._check_width(self.forward(_rows(x, 0, 1)).float())
        y = self._check_labels(x, y, labels_checked)
        self.head_input = None  # the mode sets it where it sees h (last-layer)
        return self._finish(*self._features(x, y))

    def replay(self, h: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> Features:
        """Features of a batch from the head input h (B, H) and the logits (B, C), float32 on
        the model's device, that `__call__` computed on it when `replayable` was True: the
        same bits, without the forward (pass 2 from what pass 1 kept, passes/kept.py)."""
        self.head_input = None
        return self._finish(*self._closed_form(h, logits, y))

    def _finish(self, grads: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor,
                y: torch.Tensor) -> Features:  # fmt: skip
        if self.projector is not None:
            grads = self.projector(grads)  # (B, k)
        return Features(grads=grads, loss=loss, logits=logits, labels=y, head_input=self.head_input)

    def _features(self, x: Inputs, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, D) float32 gradients, (B,) loss, (B, C) logits and the labels used: the mode's."""
        raise NotImplementedError

    def _closed_form(
        self, h: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """`_features` from the head's input and output, where the mode has a closed form."""
        raise NotImplementedError(f"{self.mode} features have no closed form")

    def _check_labels(self, x: Inputs, y: torch.Tensor, in_range: bool) -> torch.Tensor:
        if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InputError(
                f"labels must be a (B,) integer tensor, got {y.dtype} {tuple(y.shape)}"
            )
        if isinstance(x, torch.Tensor) and x.shape[:1] != y.shape:
            raise InputError(f"batch of {x.shape[0]} inputs but {y.shape[0]} labels")
        if y.numel() and self.num_classes is not None and not in_range:
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise InputError(
                    f"label {low if low < 0 else high} is outside [0, {self.num_classes})"
                )
        return y.to(torch.int64)

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


def GradientFeaturizer(
    model: nn.Module,
    *,
    mode: str = "last-layer",
    head: str | None = None,
    params: str | None = None,
    chunk_size: int = 64,
    **options: Any,
) -> Featurizer:  # noqa: N802 - reads as the class it makes
    """The featurizer of a gradient mode (`--grad`): `head` for both, `params` and `chunk_size`
    for params; `options` are `Featurizer`'s (projection, precision, output key, labels)."""
    if mode not in MODES:
        raise InputError(f"gradient mode {mode!r} is not one of {list(MODES)}")
    if mode == "last-layer":
        from .last_layer import LastLayerFeaturizer

        return LastLayerFeaturizer(model, head=head, chunk_size=chunk_size, **options)
    from .params import ParamsFeaturizer

    return ParamsFeaturizer(model, head=head, params=params, chunk_size=chunk_size, **options)
