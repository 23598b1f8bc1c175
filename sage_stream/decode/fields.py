"""Fields: finding a sample's input and label in the layouts people have.

Where it sits: read (formats) → **fields** → decode → batch. A tar sample's fields are raw
member bytes keyed by extension (``png``, ``cls``, ``seg.png``); a Parquet sample's are the
row's columns as Python values, where a struct column is a dict. This module says, for both:

- where a named field is: ``--input-key image.bytes`` is the exact field if there is one (tar
  fields contain dots), else the lower-cased name (webdataset lower-cases extensions), else a
  path into nested structs (``image`` then ``bytes``);
- what a value is: image bytes (a member, a binary column, or a Hugging Face ``datasets``
  Image struct ``{"bytes": ..., "path": ...}``), ``.npy`` bytes, or an array (a list column,
  nested lists, a tensor column);
- which field is the input when ``--input-key`` is not given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp"})
INPUT_EXTENSIONS = IMAGE_EXTENSIONS | {"npy"}
NPY_MAGIC = b"\x93NUMPY"
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM")
_MISSING = object()


def lookup(fields: Mapping[str, Any], name: str) -> Any:
    """The value of field ``name`` (see the module docstring), or None if there is none."""
    if name in fields:
        return fields[name]
    if name.lower() in fields:
        return fields[name.lower()]
    value = _nested(fields, name.split("."))
    return None if value is _MISSING else value


def _nested(value: Any, parts: list[str]) -> Any:
    # the longest prefix that names a key first: a column may itself contain a dot
    if not parts:
        return value
    if not isinstance(value, Mapping):
        return _MISSING
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in value:
            found = _nested(value[head], parts[cut:])
            if found is not _MISSING:
                return found
    return _MISSING


def names(fields: Mapping[str, Any]) -> list[str]:
    """Every field name, struct members as ``column.member`` (for error messages)."""
    out: list[str] = []
    for name, value in fields.items():
        if isinstance(value, Mapping) and value:
            out.extend(f"{name}.{sub}" for sub in names(value))
        else:
            out.append(name)
    return sorted(out)


def image_struct_bytes(value: Any) -> bytes | None:
    """The bytes of a Hugging Face Image struct ``{"bytes": b"...", "path": ...}``, else None.

    A struct holding only a path (images left outside the file) is a ValueError: shards are
    read as they are, and a path is not the image.
    """
    if not isinstance(value, Mapping) or "bytes" not in value:
        return None
    data = value["bytes"]
    if isinstance(data, bytes) and data:
        return data
    path = value.get("path")
    raise ValueError(
        f"the image struct holds no bytes (path {path!r}); write the images into the file, "
        "e.g. with datasets' Image feature and .to_parquet()"
    )


def sniff(data: bytes) -> str | None:
    """``"npy"`` or ``"image"`` from the first bytes, or None."""
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "image"
    return None


def is_array(value: Any) -> bool:
    return isinstance(value, list | np.ndarray)


def extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def input_candidates(fields: Mapping[str, Any]) -> list[str]:
    """Fields that look like the input.

    First the rule that has always held: members with an input extension (tar) and list
    columns (Parquet). Only if none matches, the newer layouts: image structs and binary
    columns whose bytes are an image or ``.npy`` (so no earlier job becomes ambiguous).
    """
    found = [
        name
        for name, value in fields.items()
        if (isinstance(value, bytes) and extension(name) in INPUT_EXTENSIONS) or is_array(value)
    ]
    if found:
        return found
    for name, value in fields.items():
        if (
            isinstance(value, Mapping)
            and isinstance(value.get("bytes"), bytes)
            or isinstance(value, bytes)
            and sniff(value) is not None
        ):
            found.append(name)
    return found


def label_hint(fields: Mapping[str, Any], asked: str) -> str:
    """`; pass --label-key label` when a field by a usual label name exists."""
    for name in ("label", "labels", "cls", "class", "target", "y"):
        if name != asked and name in fields:
            return f"; pass --label-key {name}"
    return "; pass --label-key NAME, or --label-key none for unlabeled data"
