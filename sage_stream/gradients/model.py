"""The proxy model that judges the samples: built from a factory, loaded safely, fingerprinted.

The model is a user factory `module:function` returning an `nn.Module`; its weights come from
`--checkpoint`, a state dict read with `torch.load(weights_only=True)` so that a checkpoint can
never run code. Factories take arguments from `--model-arg key=value` (`num_classes=10`), and a
model may return what the ecosystem returns: a tensor of logits, a tuple (logits first), a dict
or a `ModelOutput` (its `logits`), or the entry named by `--output-key`. The fingerprint (a
hash of the weights) goes into the sketch store, so that a sketch made by one model is never
silently used with another. Without `--checkpoint`, the factory's own initialisation is drawn
from `--seed`, so that the same command gives the same weights and resumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, cast

import torch
from torch import nn

from ..decode.decoder import load_callable, user_error
from ..errors import InputError, SageError
from ..storage import exists, open_input


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


def build_model(
    factory: str | Callable[..., nn.Module] | nn.Module, args: Mapping[str, Any] | None = None
) -> nn.Module:
    """Call the factory (`module:function`, a callable, or an `nn.Module` used as is) with the
    keyword arguments `args` (`--model-arg`)."""
    if isinstance(factory, nn.Module):
        if args:
            raise InputError("--model-arg needs a model factory, not a ready nn.Module")
        return factory
    fn = load_callable(factory) if isinstance(factory, str) else factory
    try:
        model = fn(**dict(args or {}))
    except SageError:
        raise
    except Exception as exc:  # user code: one line naming it; its traceback is under -v
        if isinstance(exc, TypeError) and args:
            raise InputError(
                f"model factory {factory!r} with --model-arg {dict(args)}: {exc}"
            ) from None
        raise InputError(f"model factory {factory!r} failed: {user_error(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model factory {factory!r} returned {type(model).__name__}, not nn.Module"
        )
    return model


def seeded_build(
    factory: str | Callable[..., nn.Module] | nn.Module, args: Mapping[str, Any] | None, seed: int
) -> nn.Module:
    """`build_model` with torch's CPU and CUDA generators seeded from `seed`, restored after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build_model(factory, args)


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
        # every missing, unexpected and mis-sized key, on one line: the useful part is there
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
        detail = detail.removeprefix("Error(s) in loading state_dict for ")
        if len(detail) > 4000:  # a wrong architecture lists every key; say how many more
            detail = f"{detail[:4000]} ... ({len(detail) - 4000} more characters)"
        raise InputError(f"checkpoint {url} does not fit the model: {detail}") from None


def fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_model(
    factory: str | Callable[..., nn.Module] | nn.Module,
    checkpoint: str | None,
    device: torch.device,
    storage_options: dict | None = None,
    args: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """Build, load, fingerprint and move the model; returns it in eval mode.

    With no checkpoint the factory runs under torch's generator seeded with `seed` (--seed):
    the same command then gets the same starting weights, hence the same fingerprint, and
    resumes instead of being refused as another model. The caller's generator is left as
    it was.
    """
    if checkpoint:
        model = build_model(factory, args)
        load_checkpoint(model, checkpoint, storage_options)
    else:
        model = seeded_build(factory, args, seed)
    digest = fingerprint(model)
    return model.to(device).eval(), digest


def logits_of(out: Any, output_key: str | None = None) -> Any:
    """The logits in a model's output: the tensor itself; with `output_key`, that entry (a dict
    key, an attribute, or a tuple index); else `.logits` / `["logits"]`; else a tuple's first
    element. Anything else is an InputError saying what the model returned."""
    if output_key is not None:
        return _entry(out, output_key)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:  # dicts, transformers' ModelOutput
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, Sequence) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        raise InputError(
            f"the model returns a {type(out).__name__} with keys {sorted(map(str, out))} and no "
            "'logits': name the logits with --output-key KEY"
        )
    raise InputError(
        f"the model returns {type(out).__name__}, not logits: return a (B, C) tensor, or name "
        "the logits with --output-key KEY"
    )


def _entry(out: Any, key: str) -> Any:
    if isinstance(out, Mapping) and key in out:
        return out[key]
    if isinstance(out, Sequence) and not isinstance(out, str) and key.lstrip("-").isdigit():
        index = int(key)
        if -len(out) <= index < len(out):
            return out[index]
    if not isinstance(out, torch.Tensor) and hasattr(out, key):
        return getattr(out, key)
    have = sorted(map(str, out)) if isinstance(out, Mapping) else type(out).__name__
    raise InputError(f"--output-key {key!r} is not in the model's output ({have})")
