"""Where shards are: the edge between what a user typed and the shards the readers open.

The first step of the flow: ``expand_inputs`` turns URLs, brace patterns, globs, folders and
``@list.txt`` into an ordered list of ``ShardRef``; the readers in ``sage_stream.formats``
then open each one through ``sage_stream.storage``. Listing and ``@list.txt`` reads are
retried like every other storage call.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import posixpath
from collections.abc import Sequence
from typing import Any, cast

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem

from sage_stream.errors import InputError
from sage_stream.formats import FORMATS
from sage_stream.sample import Format, ShardRef
from sage_stream.storage.fs import filesystem, join, normalize_url, open_input, storage_reason
from sage_stream.storage.retry import call

# suffix -> format, from the formats' registry (formats.FORMATS)
SHARD_SUFFIXES = {suffix: f.name for f in FORMATS.values() for suffix in f.suffixes}


def shard_suffix(name: str) -> str:
    """The extension that says a file's shard format: `.tar.gz` whole, else the last one."""
    lowered = name.rstrip("/").lower()
    if lowered.endswith(".tar.gz"):
        return ".tar.gz"
    return posixpath.splitext(lowered)[1]


# Below this many URLs from one brace pattern, ask for each object; above, list each parent
# folder once instead (10,000 HEAD requests against S3 would take minutes).
_LIST_THRESHOLD = 8


def shard_format(url: str) -> Format:
    """The shard format implied by a URL's extension; InputError for anything else."""
    suffix = shard_suffix(url)
    if suffix not in SHARD_SUFFIXES:
        raise InputError(
            f"{url}: unknown shard format {suffix or '(no extension)'!r}; "
            f"expected {', '.join(SHARD_SUFFIXES)}"
        )
    return cast(Format, SHARD_SUFFIXES[suffix])


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
    """URLs of one input (no ``@``): brace expansion first, then each part as glob/folder/URL.

    An input that exists as typed is that file or folder, even when its name holds glob or
    brace characters (``in pút [1]/``): only an input that does not exist is a pattern.
    """
    literal = _existing_literal(item, storage_options)
    if literal is not None:
        return literal
    parts = list(braceexpand.braceexpand(normalize_url(item)))
    # One filesystem for the whole pattern: its parts differ only inside the braces.
    fs, _ = filesystem(parts[0], storage_options)
    paths = [fs._strip_protocol(p) for p in parts]
    kinds = _stat_many(fs, [p for p in paths if not globlib.has_magic(p)])
    urls: list[str] = []
    for part, path in zip(parts, paths, strict=True):
        if globlib.has_magic(part):
            matches = _listing(fs, "glob", path, detail=True)
            found = sorted(p for p, info in matches.items() if _is_file(info))
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


def _existing_literal(item: str, storage_options: dict | None) -> list[str] | None:
    """The shards of ``item`` taken literally, if it has pattern characters and exists."""
    url = normalize_url(item)
    if not globlib.has_magic(url) and "{" not in url:
        return None  # no pattern: the ordinary path below reports a missing input
    fs, _ = filesystem(url, storage_options)
    path = fs._strip_protocol(url)
    try:
        kind = fs.info(path).get("type")
    except Exception:  # noqa: BLE001 - a probe: not there (or not readable) means a pattern
        return None
    if kind == "directory":
        return _folder_shards(fs, path, item)
    return [_canonical(fs, path)] if kind == "file" else None


def _listing(fs: fsspec.AbstractFileSystem, op: str, path: str, **kw: Any) -> Any:
    """``fs.<op>(path)`` (info, ls, glob), retried; access denied becomes an InputError."""
    url = _canonical(fs, path)
    try:
        return call(getattr(fs, op), path, what=f"{op} {url}", **kw)
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise InputError(f"{url}: access denied: {storage_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - after retries, any storage failure ends expansion
        raise InputError(f"{url}: cannot {op}: {storage_reason(e)}") from None


def _is_file(info: dict) -> bool:
    return info.get("type") == "file"


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str, item: str) -> list[str]:
    entries = _listing(fs, "ls", path, detail=True)
    found = sorted(
        e["name"] for e in entries if _is_file(e) and shard_suffix(e["name"]) in SHARD_SUFFIXES
    )
    if not found:
        raise InputError(f"{item}: folder has no .tar, .tar.gz, .tgz, .parquet or .pq files")
    return [_canonical(fs, p) for p in found]


def _stat_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str]:
    """Map path -> "file" | "directory" for the paths that exist (listing parents when many)."""
    if len(paths) > _LIST_THRESHOLD:
        with contextlib.suppress(NotImplementedError, ValueError):
            return _stat_by_listing(fs, paths)
    kinds: dict[str, str] = {}
    for path in paths:
        try:
            kinds[path] = _listing(fs, "info", path).get("type", "file")
        except FileNotFoundError:
            continue
    return kinds


def _stat_by_listing(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for parent in sorted({fs._parent(p) for p in paths}):
        try:
            entries = _listing(fs, "ls", parent, detail=True)
        except FileNotFoundError:
            continue
        kinds.update({e["name"].rstrip("/"): e.get("type", "file") for e in entries})
    wanted = {p.rstrip("/") for p in paths}
    return {p: k for p, k in kinds.items() if p in wanted}


def _read_list(list_url: str, storage_options: dict | None) -> list[str]:
    """Entries of an ``@list.txt`` file, with relative entries resolved against its folder."""
    fs, path = filesystem(normalize_url(list_url), storage_options)
    try:
        with open_input(list_url, storage_options) as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"@{list_url}: input list is not UTF-8 text: {e}") from None
    except Exception as e:  # after retries: missing, denied, or the store kept failing
        raise InputError(f"@{list_url}: cannot read input list: {storage_reason(e)}") from None
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
