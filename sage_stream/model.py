"""The proxy model that judges the samples: built from a factory, loaded safely, fingerprinted.

The model is a user factory `module:function` returning an `nn.Module`; its weights come from
`--checkpoint`, a state dict read with `torch.load(weights_only=True)` so that a checkpoint can
never run code. The fingerprint (a hash of the weights) goes into the sketch store, so that a
sketch made by one model is never silently used with another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import IO, Any, cast

import torch
from torch import nn

from .decode import load_callable
from .errors import InputError
from .storage import exists, open_input


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r}: {exc}") from None


def build_model(factory: str | Callable[[], nn.Module] | nn.Module) -> nn.Module:
    """Call the factory (`module:function`, a callable, or an `nn.Module` used as is)."""
    if isinstance(factory, nn.Module):
        return factory
    fn = load_callable(factory) if isinstance(factory, str) else factory
    model = fn()
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model factory {factory!r} returned {type(model).__name__}, not nn.Module"
        )
    return model


def load_checkpoint(model: nn.Module, url: str, storage_options: dict | None = None) -> None:
    """Load a state dict (optionally nested under "state_dict" or "model") into `model`."""
    if not exists(url, storage_options):
        raise InputError(f"checkpoint {url} does not exist")
    with open_input(url, storage_options) as f:
        try:
            # torch.load reads any file-like object; its stub asks for IO[bytes]
            state: Any = torch.load(cast(IO[bytes], f), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises a zoo of types for bad or unsafe files
            raise InputError(f"checkpoint {url} cannot be loaded safely: {exc}") from None
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"checkpoint {url} does not fit the model: {first}") from None


def fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_model(
    factory: str | Callable[[], nn.Module] | nn.Module,
    checkpoint: str | None,
    device: torch.device,
    storage_options: dict | None = None,
) -> tuple[nn.Module, str]:
    """Build, load, fingerprint and move the model; returns it in eval mode."""
    model = build_model(factory)
    if checkpoint:
        load_checkpoint(model, checkpoint, storage_options)
    digest = fingerprint(model)
    return model.to(device).eval(), digest
