"""Where shards are: the edge between user-given inputs and the storage every stage reads.

The first step of the flow: ``expand_inputs`` turns what a user typed (URLs, brace patterns,
globs, folders, ``@list.txt``) into an ordered list of ``ShardRef``; the readers in
``sage_stream.formats`` then open each one. Every stage that writes (scores, the sketch store,
emitted shards, the manifest) goes through ``atomic_write`` so that no partial object is ever
visible under its final name.

All access is through fsspec, so local paths, ``memory://``, ``s3://``, ``gs://`` and the rest
behave alike. Local paths are kept as plain absolute paths (``file://`` is stripped) because
zarr and some readers refuse ``file://`` URLs.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import posixpath
import secrets
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import braceexpand
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sage_stream.errors import InputError
from sage_stream.sample import Format, ShardRef

SHARD_SUFFIXES: dict[str, Format] = {".tar": "tar", ".parquet": "parquet", ".pq": "parquet"}

# Below this many URLs from one brace pattern, ask for each object; above, list each parent
# folder once instead (10,000 HEAD requests against S3 would take minutes).
_LIST_THRESHOLD = 8


def filesystem(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path within it (``file://`` and plain paths alike)."""
    return url_to_fs(url, **(storage_options or {}))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL (``s3://b/out`` + ``shards`` + ``a.tar``)."""
    if "://" not in base and "::" not in base:
        return os.path.join(base, *parts)
    out = base
    for part in parts:
        if part:
            out = (out if out.endswith("/") else out + "/") + part.lstrip("/")
    return out


def normalize_url(url: str) -> str:
    """``file://`` URLs become plain paths; everything else is returned unchanged."""
    return url[len("file://") :] if url.startswith("file://") else url


def shard_format(url: str) -> Format:
    """The shard format implied by a URL's extension; InputError for anything else."""
    suffix = posixpath.splitext(url.rstrip("/"))[1].lower()
    if suffix not in SHARD_SUFFIXES:
        raise InputError(
            f"{url}: unknown shard format {suffix or '(no extension)'!r}; "
            "expected .tar, .parquet or .pq"
        )
    return SHARD_SUFFIXES[suffix]


def expand_inputs(inputs: Sequence[str], storage_options: dict | None = None) -> list[ShardRef]:
    """Expand user inputs into shards, in the order given (sorted within a glob or folder).

    Each input is a URL, a brace pattern (``shard-{000..099}.tar``, ``{a,b}.tar``), a glob
    (``*.tar``), a folder (its ``.tar``/``.parquet``/``.pq`` files, not recursive) or
    ``@list.txt`` (one input per line; blank lines and ``#`` comments ignored; relative entries
    resolved against the list's folder). Raises InputError for a pattern matching nothing, a
    missing URL, an unknown extension, a duplicate URL, or two shards with the same name
    (outputs are named after input shards, so names must be unique).
    """
    if not inputs:
        raise InputError("no inputs given")
    urls: list[str] = []
    for item in inputs:
        if item.startswith("@"):
            for entry in _read_list(item[1:], storage_options):
                urls.extend(_expand_one(entry, storage_options))
        else:
            urls.extend(_expand_one(item, storage_options))
    return _to_refs(urls)


def _to_refs(urls: list[str]) -> list[ShardRef]:
    refs: list[ShardRef] = []
    by_name: dict[str, str] = {}
    for url in urls:
        name = posixpath.basename(url.rstrip("/"))
        if name in by_name:
            if by_name[name] == url:
                raise InputError(f"{url}: given more than once in the inputs")
            raise InputError(
                f"two input shards are named {name!r} ({by_name[name]} and {url}); "
                "outputs are named after input shards, so names must be unique"
            )
        by_name[name] = url
        refs.append(ShardRef(url=url, name=name, format=shard_format(url)))
    return refs


def _canonical(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """One spelling per object, so that duplicates are found: abs path or full URL."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _expand_one(item: str, storage_options: dict | None) -> list[str]:
    """URLs of one input (no ``@``): brace expansion first, then each part as glob/folder/URL."""
    parts = list(braceexpand.braceexpand(normalize_url(item)))
    # One filesystem for the whole pattern: its parts differ only inside the braces.
    fs, _ = filesystem(parts[0], storage_options)
    paths = [fs._strip_protocol(p) for p in parts]
    kinds = _stat_many(fs, [p for p in paths if not globlib.has_magic(p)])
    urls: list[str] = []
    for part, path in zip(parts, paths, strict=True):
        if globlib.has_magic(part):
            found = sorted(p for p, info in fs.glob(path, detail=True).items() if _is_file(info))
            if not found:
                raise InputError(f"{item}: pattern matches nothing")
            urls.extend(_canonical(fs, p) for p in found)
        elif kinds.get(path) == "directory":
            urls.extend(_folder_shards(fs, path, item))
        elif kinds.get(path) == "file":
            urls.append(_canonical(fs, path))
        else:
            where = "" if part == item else f" (from {item})"
            raise InputError(f"{part}: does not exist{where}")
    return urls


def _is_file(info: dict) -> bool:
    return info.get("type") == "file"


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str, item: str) -> list[str]:
    entries = fs.ls(path, detail=True)
    found = sorted(
        e["name"]
        for e in entries
        if _is_file(e) and posixpath.splitext(e["name"])[1].lower() in SHARD_SUFFIXES
    )
    if not found:
        raise InputError(f"{item}: folder has no .tar, .parquet or .pq files")
    return [_canonical(fs, p) for p in found]


def _stat_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str]:
    """Map path -> "file" | "directory" for the paths that exist (listing parents when many)."""
    if len(paths) > _LIST_THRESHOLD:
        with contextlib.suppress(NotImplementedError, ValueError):
            return _stat_by_listing(fs, paths)
    kinds: dict[str, str] = {}
    for path in paths:
        try:
            kinds[path] = fs.info(path).get("type", "file")
        except FileNotFoundError:
            continue
    return kinds


def _stat_by_listing(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for parent in sorted({fs._parent(p) for p in paths}):
        try:
            entries = fs.ls(parent, detail=True)
        except FileNotFoundError:
            continue
        kinds.update({e["name"].rstrip("/"): e.get("type", "file") for e in entries})
    wanted = {p.rstrip("/") for p in paths}
    return {p: k for p, k in kinds.items() if p in wanted}


def _read_list(list_url: str, storage_options: dict | None) -> list[str]:
    """Entries of an ``@list.txt`` file, with relative entries resolved against its folder."""
    fs, path = filesystem(normalize_url(list_url), storage_options)
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"@{list_url}: cannot read input list: {e}") from e
    folder = _canonical(fs, fs._parent(path))
    entries: list[str] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("@"):
            raise InputError(f"@{list_url}: nested lists are not supported ({entry})")
        entry = normalize_url(entry)
        relative = "://" not in entry and "::" not in entry and not os.path.isabs(entry)
        entries.append(join(folder, entry) if relative else entry)
    if not entries:
        raise InputError(f"@{list_url}: input list is empty")
    return entries


@contextlib.contextmanager
def atomic_write(url: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at ``url`` only if the block exits without exception.

    Writes go to a sibling ``<name>.tmp-<random>`` which is moved into place on success and
    removed on failure. A local rename is atomic; on object stores the move is a server-side
    copy, so readers see either nothing or the whole object, never a partial one (s3fs would
    otherwise commit a partial object when an exception escapes ``fs.open``).
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` all-or-nothing (see ``atomic_write``)."""
    with atomic_write(url, storage_options) as f:
        f.write(data)
