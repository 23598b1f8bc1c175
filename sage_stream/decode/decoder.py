"""Decode: the step between reading a shard and batching for the model.

Turns a ``Sample`` into ``(input tensor, label)``, either with the built-in decoders (``npy``,
``png``/``jpg``/``jpeg``/``webp`` images, integer ``cls``/``txt`` labels, Parquet list
columns) or with a user ``preprocess`` function ``module:function``. Every failure is a
``SampleError`` naming the shard and key, so that ``--on-error skip`` can record it.

Shards are untrusted: ``.npy`` members are loaded with ``allow_pickle=False`` (object arrays
are refused, never unpickled) and images go through Pillow's decompression-bomb limit.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, SampleError
from ..gzip_members import gunzipped
from ..sample import Sample
from . import fields
from .fields import IMAGE_EXTENSIONS, NPY_MAGIC
from .images import ImageTransform
from .npy import load_npy

Decoder = Callable[[Sample], tuple[Any, int]]  # input: a tensor, or a dict of tensors
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20  # Config.max_member_bytes's default


def decode_npy(data: bytes) -> np.ndarray:
    """An array from ``.npy`` bytes; never unpickles (object arrays are a ValueError)."""
    array = load_npy(data)
    if not isinstance(array, np.ndarray):  # np.load also opens .npz archives
        raise ValueError("not a single .npy array")
    if array.dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return array


# Larger images are refused from their header, before a pixel is decoded: a 245 KB PNG can
# hold 84 Mpx (2.6 GB as float32 RGB). 2**25 (5792², 33.5 Mpx) is far above any model input.
MAX_IMAGE_PIXELS = 2**25


def decode_image(data: bytes, transform: ImageTransform | None = None) -> torch.Tensor:
    """Image bytes -> float32 tensor (C, H, W) in [0, 1]; L gives 1 channel, all else RGB.

    With a `transform` (--resize, --crop, --normalize, --image-mode) it does the conversion.
    An image of more than MAX_IMAGE_PIXELS pixels is a ValueError, read from its header.
    """
    with Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{MAX_IMAGE_PIXELS} (2**25): not decoded"
            )
        if transform is not None:
            return transform(opened)
        image = opened if opened.mode in ("L", "RGB") else opened.convert("RGB")
        array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor.contiguous().float().div_(255.0)


_LABEL_RE = re.compile(r"-?[0-9]+", re.ASCII)


def decode_label(value: object) -> int:
    """An integer class label from an int, or from bytes/str holding one (whitespace allowed)."""
    if isinstance(value, np.generic | torch.Tensor) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool):
        raise ValueError(f"label must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bytes | str):
        # ASCII digits only: Python's int() also takes "0_3", "٣" and "３" as 3
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        match = _LABEL_RE.fullmatch(text.strip(" \t\r\n"))
        if match is not None:
            return int(match.group())
    raise ValueError(f"not an integer label: {_short(value)}")


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_error(exc: BaseException) -> str:
    """One line for an exception raised by user code, pointing at -v for its traceback."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first} (run with -v for the traceback)"


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (attribute paths like ``mod:Class.method`` allowed).

    The current working directory is put on ``sys.path`` first, as ``python -m`` would, so a
    user's ``preprocess.py`` or ``model.py`` next to where they run is found.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad callable {spec!r}: expected MODULE:FUNCTION")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import {module_name!r} for {spec!r}: {e}") from e
    except Exception as e:  # the module's own code failed as it was imported
        raise InputError(f"importing {module_name!r} for {spec!r} failed: {user_error(e)}") from e
    for part in attr.split("."):
        if not hasattr(target, part):
            raise InputError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise InputError(f"{spec!r} is not callable")
    return target


def make_decoder(
    *,
    input_key: str | None = None,
    label_key: str | None = "cls",
    preprocess: str | Callable[[Sample], tuple[Any, Any]] | None = None,
    transform: ImageTransform | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Decoder:
    """A function ``Sample -> (input tensor, label)`` raising SampleError on a bad sample.

    With ``preprocess`` (a callable or ``"module:function"``, loaded now so a bad spec fails
    early) the user function does all the work. Otherwise the input is field ``input_key`` or
    the single field that looks like one (``*.npy``/image bytes, or a list-valued Parquet
    column), and the label is field ``label_key`` (``None``: unlabeled, every label 0;
    ``"predicted"``: 0 here, the model's argmax replaces it before the gradients). The
    result is picklable when ``preprocess`` is an importable function. ``transform`` applies
    to image members (``transforms.ImageTransform``); a preprocess does its own. With
    ``tokenizer`` (a local tokenizer folder or ``.json`` file) the input is text, tokenized to
    at most ``max_length`` ids (``decode/text.py``). Members named ``*.gz`` are decompressed
    first, to at most ``max_member_bytes`` (``sage_stream.gzip_members``), for the built-in
    decoders and the tokenizer; a preprocess gets the sample as read.
    """
    if label_key == "predicted":  # the model labels each sample (a placeholder 0 here)
        label_key = None
    if preprocess is not None:
        fn = load_callable(preprocess) if isinstance(preprocess, str) else preprocess
        return functools.partial(_decode_with, fn)
    if tokenizer is not None:  # text: the tokenizer decodes (decode/text.py)
        from .text import TextDecoder

        label = functools.partial(_label, label_key=label_key)
        text = TextDecoder(tokenizer, max_length, input_key, label)
        return functools.partial(gunzipped, text, max_member_bytes)
    builtin = functools.partial(
        _decode_builtin, input_key=input_key, label_key=label_key, transform=transform
    )
    return functools.partial(gunzipped, builtin, max_member_bytes)


def _decode_with(fn: Callable[[Sample], tuple[Any, Any]], sample: Sample) -> tuple[Any, int]:
    try:
        result = fn(sample)
    except SampleError:
        raise
    except Exception as e:  # user code: any failure is this sample's failure, not the run's
        raise SampleError(
            sample.shard, sample.key, f"preprocess failed: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(result, tuple) or len(result) != 2:
        raise SampleError(sample.shard, sample.key, "preprocess must return (input, label)")
    x, label = result
    try:
        if isinstance(x, Mapping):  # a dict of model inputs (input_ids, attention_mask, ...)
            return {str(k): torch.as_tensor(v) for k, v in x.items()}, decode_label(label)
        return torch.as_tensor(x), decode_label(label)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SampleError(sample.shard, sample.key, f"bad preprocess result: {e}") from e


def _decode_builtin(
    sample: Sample,
    *,
    input_key: str | None,
    label_key: str | None,
    transform: ImageTransform | None = None,
) -> tuple[torch.Tensor, int]:
    name = input_key if input_key is not None else _find_input(sample)
    value = fields.lookup(sample.fields, name)
    if value is None:
        _fail(sample, f"missing input field {name!r}; fields are {fields.names(sample.fields)}")
    try:
        x = _decode_value(name, value, transform)
    except Exception as e:  # decoders raise many types (PIL, numpy, zlib); all mean "bad member"
        _fail(sample, f"cannot decode {name!r}: {e}")
    return x, _label(sample, label_key)


def _find_input(sample: Sample) -> str:
    candidates = fields.input_candidates(sample.fields)
    if not candidates:
        _fail(
            sample,
            f"no input member: fields are {fields.names(sample.fields)}; pass --input-key",
        )
    if len(candidates) > 1:
        _fail(sample, f"ambiguous input: candidates are {sorted(candidates)}; pass --input-key")
    return candidates[0]


def _label(sample: Sample, label_key: str | None) -> int:
    if label_key is None:
        return 0
    value = fields.lookup(sample.fields, label_key)
    if value is None:
        hint = fields.label_hint(sample.fields, label_key)
        _fail(
            sample,
            f"missing label field {label_key!r}; fields are {fields.names(sample.fields)}{hint}",
        )
    try:
        return decode_label(value)
    except (ValueError, UnicodeDecodeError) as e:
        _fail(sample, f"bad label in {label_key!r}: {e}")


def _decode_value(
    name: str, value: object, transform: ImageTransform | None = None
) -> torch.Tensor:
    """Bytes by extension (or by content when the name has none we know); a Hugging Face
    image struct by its bytes; lists, nested lists and tensor columns via numpy."""
    if isinstance(value, Mapping):
        data = fields.image_struct_bytes(value)
        if data is None:
            members = sorted(str(k) for k in value)
            raise ValueError(
                f"it is a struct with members {members}: name one, as --input-key "
                f"{name}.{members[0] if members else 'MEMBER'}"
            )
        return decode_image(data, transform)
    if isinstance(value, bytes):
        ext = fields.extension(name)
        if ext == "npy" or (ext not in IMAGE_EXTENSIONS and value.startswith(NPY_MAGIC)):
            return torch.from_numpy(np.asarray(decode_npy(value), dtype=np.float32))
        return decode_image(value, transform)
    array = np.asarray(value, dtype=np.float32)
    if not np.isfinite(array).all():  # a Parquet null inside a list arrives here as NaN
        raise ValueError("contains null or non-finite values")
    return torch.from_numpy(array)


def _fail(sample: Sample, reason: str) -> NoReturn:
    raise SampleError(sample.shard, sample.key, reason)
