"""Storage primitives every stage uses: fsspec access that survives transient errors.

The edge of the flow where bytes meet object storage. Every call here is retried on
transient errors (``storage.retry``). Shards are read as bounded, resumable streams
(``open_shard``, ``open_input``) and never copied whole. Every write goes through
``atomic_write``, so no partial object is ever visible under its final name. On S3 and GCS a
write is a multipart upload committed only on success; elsewhere it is a temporary name
moved into place.

Local paths are kept as plain absolute paths (``file://`` is stripped) because zarr and some
readers refuse ``file://`` URLs. ``s3://`` (s3fs) and ``gs://`` (gcsfs) take their
credentials and endpoint from the standard environment and config files, plus any
``storage_options`` (``--storage-option K=V``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from sage_stream.errors import InputError, SageError, ShardError, StorageError
from sage_stream.storage.retry import RetryingReader, call, error_text

# Read shards in ranged requests of this size (s3fs would take 50 MiB): memory per open shard
# stays about one block whatever the shard size. A ``default_block_size`` storage option wins.
READ_BLOCK_BYTES = 16 * 2**20
# Filesystems whose files can be opened with autocommit=False and later commit()ed or
# discard()ed: a multipart upload that is invisible until it completes.
_DEFERRED_COMMIT = frozenset({"s3", "s3a", "gs", "gcs"})
log = logging.getLogger("sage_stream")


def temporary_path(fs: fsspec.AbstractFileSystem, path: str, scratch: str | None) -> str:
    """Where ``_write_then_move`` writes ``path`` before moving it into place.

    In ``scratch`` (a folder only temporaries live in, OUT/_work/tmp for everything under
    OUT) when given, so that clearing up is removing that folder and never matching a pattern
    against names users chose; else a hidden sibling. A random part keeps writers apart.
    """
    name = f"{secrets.token_hex(6)}-{path.rstrip('/').rsplit('/', 1)[-1]}"
    if scratch is not None:
        return fs._strip_protocol(normalize_url(scratch)).rstrip("/") + "/" + name
    return f"{fs._parent(path)}/.{name}.partial"


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
        raise InputError(f"{url}: {error_text(e)}{hint}") from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise InputError(f"{url}: {error_text(e)}") from None


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


def storage_reason(exc: BaseException) -> str:
    """One line saying why storage failed, with what to do for the usual causes."""
    if isinstance(exc, FileNotFoundError):
        return f"does not exist (404 or removed since the inputs were listed): {error_text(exc)}"
    if isinstance(exc, PermissionError):
        return f"access denied (403): {error_text(exc)}; check the credentials and bucket policy"
    return error_text(exc)


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


def open_shard(
    url: str, storage_options: dict | None = None, *, pin: str | None = None
) -> RetryingReader:
    """Open an input shard as a bounded, resumable stream; ShardError if it cannot be read.

    With ``pin`` (``pin_of`` when the inputs were listed) a shard whose contents changed
    since is a ShardError saying so, before a byte is used.
    """
    if pin is not None:
        now = _pin_or_error(url, storage_options)
        if now != pin:
            raise ShardError(
                url,
                f"changed since the inputs were listed ({pin} -> {now}); its scores would be "
                "stale: rerun on a stable copy, or with --overwrite to score it again",
            )
    try:
        return _ShardStream(_opener(url, storage_options), url)
    except Exception as e:  # noqa: BLE001 - see _ShardStream
        raise ShardError(url, f"cannot open: {storage_reason(e)}") from e


# What names an object's contents, most specific first: a version id, then a content hash or
# ETag, else (local disk, memory://) the modification time. With the size, that is the pin.
_PIN_KEYS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash",
             "mtime", "LastModified", "updated", "created")  # fmt: skip


def pin_of(url: str, storage_options: dict | None = None, *, fresh: bool = False) -> str:
    """A short text naming what ``url`` holds now: ``size=N etag=...`` on S3, ``size=N
    mtime=...`` on a local disk. Equal pins mean the same contents (as far as the store says).

    Right after a listing the listing's own entries are used (no request per shard); with
    ``fresh`` the store is asked again, past any cached listing.
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    if fresh:
        fs.invalidate_cache(path)
    info = call(fs.info, path, what=f"info {url}")
    parts = [f"size={info.get('size')}"]
    for key in _PIN_KEYS:
        value = info.get(key)
        if value is not None and value != "":
            parts.append(f"{key.lower()}={value}")
            if key not in ("VersionId", "version_id", "generation"):
                break
    return " ".join(parts)


def _pin_or_error(url: str, storage_options: dict | None) -> str:
    try:
        return pin_of(url, storage_options, fresh=True)
    except Exception as e:  # noqa: BLE001 - see _ShardStream
        raise ShardError(url, f"cannot open: {storage_reason(e)}") from e


@contextlib.contextmanager
def atomic_write(
    url: str, storage_options: dict | None = None, scratch: str | None = None
) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at ``url`` only if the block exits without exception.

    On S3 and GCS the file is an upload opened with autocommit off: parts go up as they fill
    (memory stays one part), and the object appears when the upload is committed at the end;
    on failure the upload is aborted and nothing appears. Elsewhere (local, memory://, ...)
    writes go to a temporary that is moved into place on success (a local rename is atomic)
    and removed on failure. The commit or move is retried on transient
    errors. Readers see either nothing or the whole object, never a partial one.

    The temporary lives in folder ``scratch`` if given (see ``temporary_path``); on a local
    disk it is fsynced before the rename and the folder after it, so a committed name survives
    a power cut with its bytes.
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    deferred = bool(set(_protocols(fs)) & _DEFERRED_COMMIT)
    try:
        if deferred:
            writer = _write_then_commit(fs, path, url)
        elif isinstance(fs, LocalFileSystem):
            writer = _write_then_rename(path, temporary_path(fs, path, scratch))
        else:
            writer = _write_then_move(fs, path, url, temporary_path(fs, path, scratch))
        with writer as f:
            yield f
    except SageError:
        raise
    except OSError as exc:  # the store still refuses after the retries: one line, not a trace
        raise StorageError(f"cannot write {url}: {error_text(exc)}") from exc


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
def _write_then_rename(path: str, tmp: str) -> Iterator[BinaryIO]:
    """Local disk: write, fsync, rename (atomic within one file system), fsync the folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(path))


def fsync_folder(folder: str) -> None:
    """Make a rename or a create in local ``folder`` durable (a no-op where folders cannot be
    opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _write_then_move(
    fs: fsspec.AbstractFileSystem, path: str, url: str, tmp: str
) -> Iterator[BinaryIO]:
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


def remove(url: str, storage_options: dict | None = None) -> None:
    """Remove a file or a folder tree; nothing happens if it is not there.

    StorageError (one line) if the store refuses after the retries, also when the object
    vanishes under the call (its bucket deleted meanwhile).
    """
    if exists(url, storage_options):
        fs, path = filesystem(normalize_url(url), storage_options)
        with _one_line("remove", url):
            call(fs.rm, path, recursive=True, what=f"remove {url}")


def list_names(url: str, storage_options: dict | None = None) -> list[str]:
    """Sorted names (not paths) of the entries directly under folder ``url``; [] if absent."""
    if not exists(url, storage_options):
        return []
    fs, path = filesystem(normalize_url(url), storage_options)
    with _one_line("list", url):
        found = call(fs.ls, path, detail=False, what=f"list {url}")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found)


@contextlib.contextmanager
def _one_line(what: str, url: str) -> Iterator[None]:
    """A storage call that still fails after the retries is a StorageError, not a trace."""
    try:
        yield
    except SageError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise more than OSError
        raise StorageError(f"cannot {what} {url}: {error_text(exc)}") from exc
