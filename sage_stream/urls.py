"""Where shards are: the edge between user-given inputs and the storage every stage reads.

The first step of the flow: ``expand_inputs`` turns what a user typed (URLs, brace patterns,
globs, folders, ``@list.txt``) into an ordered list of ``ShardRef``; the readers in
``sage_stream.formats`` then open each one. Every stage that writes (scores, the sketch store,
emitted shards, the manifest) goes through ``atomic_write`` so that no partial object is ever
visible under its final name.

All access is through fsspec, so local paths, ``memory://``, ``s3://``, ``gs://`` and the rest
behave alike. Local paths are kept as plain absolute paths (``file://`` is stripped) because
zarr and some readers refuse ``file://`` URLs.

Object storage is reached the same way: ``s3://`` (s3fs) and ``gs://`` (gcsfs) take their
credentials and endpoint from the standard environment and config files, plus any
``storage_options`` (``--storage-option K=V``). Every call that touches storage here is
retried on transient errors (``sage_stream.retry``); shards are read as bounded, resumable
streams (``open_shard``), never copied whole; on S3 and GCS writes are multipart uploads
committed only on success, elsewhere a temporary name moved into place.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import logging
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import braceexpand
import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sage_stream.errors import InputError, SageError, ShardError, StorageError
from sage_stream.retry import RetryingReader, call, describe
from sage_stream.sample import Format, ShardRef

SHARD_SUFFIXES: dict[str, Format] = {".tar": "tar", ".parquet": "parquet", ".pq": "parquet"}

# Below this many URLs from one brace pattern, ask for each object; above, list each parent
# folder once instead (10,000 HEAD requests against S3 would take minutes).
_LIST_THRESHOLD = 8
# Read shards in ranged requests of this size (s3fs would take 50 MiB): memory per open shard
# stays about one block whatever the shard size. A ``default_block_size`` storage option wins.
READ_BLOCK_BYTES = 16 * 2**20
# Filesystems whose files can be opened with autocommit=False and later commit()ed or
# discard()ed: a multipart upload that is invisible until it completes.
_DEFERRED_COMMIT = frozenset({"s3", "s3a", "gs", "gcs"})
log = logging.getLogger("sage_stream")


def filesystem(
    url: str, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path within it (``file://`` and plain paths alike).

    A protocol whose package is missing (``s3://`` without s3fs) or unknown is an InputError
    saying what to install, not a traceback.
    """
    try:
        return url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(url.split("://")[0])
        hint = f"; pip install 'sage-stream[{extra}]'" if extra else ""
        raise InputError(f"{url}: {describe(e)}{hint}") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise InputError(f"{url}: {describe(e)}") from None


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


def _listing(fs: fsspec.AbstractFileSystem, op: str, path: str, **kw: object) -> Any:
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


def storage_reason(exc: BaseException) -> str:
    """One line saying why storage failed, with what to do for the usual causes."""
    if isinstance(exc, FileNotFoundError):
        return f"does not exist (404 or removed since the inputs were listed): {describe(exc)}"
    if isinstance(exc, PermissionError):
        return f"access denied (403): {describe(exc)}; check the credentials and bucket policy"
    return describe(exc)


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` exists, asking the store again on a transient error.

    Not ``fs.exists``: fsspec's default answers False to *any* error, so a throttled request
    would read as a missing object.
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    try:
        call(fs.info, path, what=f"exists {url}")
    except FileNotFoundError:
        return False
    return True


def open_input(
    url: str, storage_options: dict | None = None, *, block_size: int | None = None
) -> RetryingReader:
    """Open ``url`` for streaming reads that survive transient errors (see RetryingReader).

    Reads go out as ranged requests of ``block_size`` bytes (default READ_BLOCK_BYTES unless a
    ``default_block_size`` storage option is set); nothing is copied locally. Raises the
    store's error (FileNotFoundError, PermissionError, ...) if it cannot be opened.
    """
    return RetryingReader(_opener(url, storage_options, block_size), url)


def _opener(
    url: str, storage_options: dict | None, block_size: int | None = None
) -> Callable[[], BinaryIO]:
    fs, path = filesystem(normalize_url(url), storage_options)
    kw: dict[str, Any] = {}
    if block_size is not None or "default_block_size" not in (storage_options or {}):
        kw["block_size"] = block_size or READ_BLOCK_BYTES
    return lambda: fs.open(path, "rb", **kw)


class _ShardStream(RetryingReader):
    """A shard's stream: any failure that survives the retries is a ShardError naming it."""

    def _retrying(self, op, fn):  # noqa: ANN001, ANN202 - same signature as the base class
        try:
            return super()._retrying(op, fn)
        except ShardError:
            raise
        except Exception as e:  # noqa: BLE001 - the store may raise anything (aiohttp, botocore)
            where = f"{op} failed at byte {self.tell()}"
            raise ShardError(self._what, f"{where}: {storage_reason(e)}") from e


def open_shard(url: str, storage_options: dict | None = None) -> BinaryIO:
    """Open an input shard as a bounded, resumable stream; ShardError if it cannot be read."""
    try:
        return _ShardStream(_opener(url, storage_options), url)
    except Exception as e:  # noqa: BLE001 - see _ShardStream
        raise ShardError(url, f"cannot open: {storage_reason(e)}") from e


@contextlib.contextmanager
def atomic_write(url: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at ``url`` only if the block exits without exception.

    On S3 and GCS the file is an upload opened with autocommit off: parts go up as they fill
    (memory stays one part), and the object appears when the upload is committed at the end;
    on failure the upload is aborted and nothing appears. Elsewhere (local, memory://, ...)
    writes go to a sibling ``<name>.tmp-<random>`` that is moved into place on success (a
    local rename is atomic) and removed on failure. The commit or move is retried on transient
    errors. Readers see either nothing or the whole object, never a partial one.
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    deferred = bool(set(_protocols(fs)) & _DEFERRED_COMMIT)
    writer = _write_then_commit if deferred else _write_then_move
    try:
        with writer(fs, path, url) as f:
            yield f
    except SageError:
        raise
    except OSError as exc:  # the store still refuses after the retries: one line, not a trace
        raise StorageError(f"cannot write {url}: {describe(exc)}") from exc


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def _write_then_commit(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Iterator[BinaryIO]:
    f = call(fs.open, path, "wb", autocommit=False, what=f"open {url} for writing")
    try:
        yield f
        f.close()  # uploads the last part; the object is still invisible
        call(f.commit, what=f"commit {url}")
    except BaseException:
        try:
            f.discard()  # aborts the multipart upload: its parts are deleted
        except Exception:  # noqa: BLE001 - the original error matters more
            log.warning(
                "could not abort the upload of %s; a bucket lifecycle rule for incomplete "
                "multipart uploads removes such parts",
                url,
                exc_info=True,
            )
        f.closed = True  # never flush or commit on garbage collection
        raise


@contextlib.contextmanager
def _write_then_move(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Iterator[BinaryIO]:
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    try:
        with call(fs.open, tmp, "wb", what=f"open {url} for writing") as f:
            yield f
        call(fs.mv, tmp, path, what=f"move {url} into place")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` all-or-nothing (see ``atomic_write``)."""
    with atomic_write(url, storage_options) as f:
        f.write(data)
