"""Thumbnails of the most and least agreeing samples, read back from the run's shards.

Part of `sage-stream report`, after EMIT. Only the few shards that hold a wanted sample are
streamed, through the same readers as the passes (``formats.read_shard``), and each stops once
its wanted keys are found. The input shards named in the manifest come first; kept samples can
also be found in the run's own ``shards/`` when an input is gone. Image members are decoded
with the passes' decoders (Pillow's decompression-bomb limit, ``.npy`` never unpickled); a
``.npy`` or list value becomes a grayscale picture when it is 2-D, an image array (CHW / HWC) or
a square-able vector (64 values -> 8×8). Anything else gets no thumbnail, only its key.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from ..config import shard_options
from ..decode.decoder import decode_image, decode_npy
from ..decode.fields import (
    IMAGE_EXTENSIONS,
    INPUT_EXTENSIONS,
    image_struct_bytes,
    is_array,
    lookup,
    sniff,
)
from ..errors import SageError
from ..formats import read_shard
from ..outputs.folder import OutputFolder
from ..sample import ShardRef

log = logging.getLogger("sage_stream")
THUMB_MAX = 96  # pixels, longer side
THUMB_MIN = 64  # tiny arrays (8×8 digits) are enlarged, pixel for pixel, to at least this


def to_image(value: Any) -> np.ndarray | None:
    """uint8 (H, W) or (H, W, 3) for an array that looks like a picture, else None."""
    a = np.squeeze(np.asarray(value))
    if a.dtype.kind not in "biuf" or a.size < 4:
        return None
    if a.ndim == 1:
        side = math.isqrt(a.size)
        if side * side != a.size:
            return None
        a = a.reshape(side, side)
    elif a.ndim == 3:
        if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if a.shape[-1] not in (1, 3):
            return None
        a = a[..., 0] if a.shape[-1] == 1 else a
    elif a.ndim != 2:
        return None
    return _to_uint8(a)


def _to_uint8(a: np.ndarray) -> np.ndarray | None:
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        return None
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0  # already [0, 1] pixels: keep their scale
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.round(scaled * 255.0).astype(np.uint8)


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _decode(name: str, value: Any) -> np.ndarray | None:
    if isinstance(value, Mapping):  # a Hugging Face image struct {"bytes", "path"}
        data = image_struct_bytes(value)
        if data is None:
            return None
        chw = decode_image(data).numpy()
        return to_image(chw if chw.shape[0] == 3 else chw[0])
    if isinstance(value, bytes):
        ext = _extension(name)
        if ext in IMAGE_EXTENSIONS or sniff(value) == "image":
            chw = decode_image(value).numpy()  # (C, H, W) float in [0, 1]
            return to_image(chw if chw.shape[0] == 3 else chw[0])
        if ext == "npy":
            return to_image(decode_npy(value))
        return None
    if is_array(value):
        return to_image(np.asarray(value, dtype=np.float64))
    return None


def thumbnail_png(fields: Mapping[str, Any], input_key: str | None = None) -> bytes | None:
    """PNG bytes of a small picture of the sample's input member, or None if it has none."""
    names = [input_key] if input_key else sorted(fields)
    for name in names:
        value = lookup(fields, name)  # tar fields are lower-cased; image.bytes is nested
        if (
            isinstance(value, bytes)
            and _extension(name) not in INPUT_EXTENSIONS
            and not (input_key or sniff(value) == "image")
        ):
            continue
        try:
            pixels = _decode(name, value)
        except Exception as exc:  # untrusted bytes: any decoder failure means "no picture"
            log.debug("report: no thumbnail from %r: %s", name, exc)
            continue
        if pixels is not None:
            return _encode(pixels)
    return None


def _encode(pixels: np.ndarray) -> bytes:
    image = Image.fromarray(pixels)
    longest = max(image.size)
    if longest < THUMB_MIN:
        factor = -(-THUMB_MIN // longest)
        image = image.resize(
            (image.width * factor, image.height * factor), Image.Resampling.NEAREST
        )
    elif longest > THUMB_MAX:
        image.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _sources(manifest: Mapping[str, Any], out: str, shard: str) -> list[ShardRef]:
    """Where a shard's samples can be read: its input, then the run's output shard."""
    refs = []
    for entry in manifest.get("inputs", []):
        if entry.get("name") == shard and entry.get("url"):
            fmt = entry.get("format", "tar")
            refs.append(ShardRef(url=entry["url"], name=shard, format=fmt))
            refs.append(ShardRef(url=OutputFolder(out).shard(shard), name=shard, format=fmt))
    return refs


def _read_some(
    ref: ShardRef, keys: set[str], options: dict[str, Any], storage_options: dict | None
) -> dict[str, dict[str, Any]]:
    """The fields of the samples of `ref` whose key is in `keys`, stopping once all are found."""
    found: dict[str, dict[str, Any]] = {}
    try:
        with contextlib.closing(read_shard(ref, storage_options, **options)) as samples:
            for sample in samples:
                if sample.key in keys and sample.key not in found:
                    found[sample.key] = sample.fields
                    if len(found) == len(keys):
                        break
    except (SageError, OSError) as exc:
        log.warning("report: cannot read %s for thumbnails: %s", ref.url, exc)
    return found


def thumbnails(
    manifest: Mapping[str, Any],
    out: str,
    wanted: Mapping[str, set[str]],
    storage_options: dict | None = None,
) -> dict[tuple[str, str], bytes]:
    """(shard, key) -> PNG thumbnail, for the wanted keys of each shard that have a picture."""
    config = manifest.get("config") or {}
    input_key = config.get("input_key") if not config.get("preprocess") else None
    pictures: dict[tuple[str, str], bytes] = {}
    for shard in sorted(wanted):
        missing = set(wanted[shard])
        for ref in _sources(manifest, out, shard):
            if not missing:
                break
            options = shard_options(config, ref.format)
            for key, fields in _read_some(ref, missing, options, storage_options).items():
                missing.discard(key)
                png = thumbnail_png(fields, input_key)
                if png is not None:
                    pictures[(shard, key)] = png
    return pictures
