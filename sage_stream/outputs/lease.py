"""OUT/_LEASE: one writer per output folder.

Every step that writes under OUT (sketch, score, select, emit, run) first creates OUT/_LEASE
exclusively, and removes it when it ends, whatever the outcome. Exclusive means the store
refuses a second create: `O_CREAT | O_EXCL` on a local disk, a conditional put
(`If-None-Match: *`, s3fs's mode "xb") on object storage. A second writer therefore stops at
once with one line naming the holder (host, pid, start time) instead of mixing its output with
the first one's. The lease is checked again just before `_SUCCESS`, so a writer whose lease
was broken (`--force-unlock`) never commits.

A lease left by a killed run is taken over when its holder is a process on this host that no
longer exists; any other lease (another host, or a live process) needs `--force-unlock`,
which the user gives once they know the other run is gone. Stores with no exclusive create
(a few fsspec backends) fall back to look-then-write, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

from ..errors import OutputLockedError, SageError, StorageError
from ..storage import filesystem, normalize_url, storage_reason
from ..storage.fs import fsync_folder
from .folder import OutputFolder

log = logging.getLogger("sage_stream")

LEASE = "_LEASE"
# lease URL -> token, for the leases this process holds (a step inside `run` reuses it)
_HELD: dict[str, str] = {}


def lease_url(folder: OutputFolder) -> str:
    return folder.path(LEASE)


@contextlib.contextmanager
def hold(folder: OutputFolder, force_unlock: bool = False) -> Iterator[None]:
    """Hold OUT's lease for the duration of the block (reentrant within one process)."""
    url = lease_url(folder)
    if url in _HELD:
        yield
        return
    token = acquire(folder, force_unlock)
    try:
        folder.abort_stale_uploads()  # no other writer now: what is open under OUT is dead
        yield
    finally:
        try:
            release(folder, token)
        except Exception:  # noqa: BLE001 - the step's own outcome matters more
            _HELD.pop(url, None)
            log.warning("could not remove the lease %s; the next run takes it over or "
                        "needs --force-unlock", url, exc_info=True)  # fmt: skip


def acquire(folder: OutputFolder, force_unlock: bool = False) -> str:
    """Create OUT/_LEASE for this process; OutputLockedError if another writer holds it."""
    url = lease_url(folder)
    if force_unlock and folder.exists(url):
        log.warning("--force-unlock: breaking the lease %s (%s)", url, _describe(_read(folder)))
        folder.remove(url)
    token = secrets.token_hex(8)
    body = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": token}  # fmt: skip
    for _ in range(2):  # the second try follows taking over a dead holder's lease
        if _create(folder, url, json.dumps(body, sort_keys=True).encode() + b"\n"):
            _HELD[url] = token
            return token
        holder = _read(folder)
        if not _dead_here(holder):
            break
        log.warning("taking over the lease %s of a run that is gone (%s)", url,
                    _describe(holder))  # fmt: skip
        folder.remove(url)
    raise OutputLockedError(
        f"{folder.url} is being written by another run ({_describe(_read(folder))}); wait "
        f"for it to end, or if it is gone, rerun with --force-unlock"
    )


def check(folder: OutputFolder) -> None:
    """Before a commit: this process still holds the lease (nobody broke and retook it)."""
    url = lease_url(folder)
    token = _HELD.get(url)
    holder = _read(folder)
    if token is None or holder is None or holder.get("token") != token:
        raise OutputLockedError(
            f"{folder.url}: this run no longer holds {LEASE} (now: {_describe(holder)}); "
            "not committing. Another writer took the folder over: rerun when it is done"
        )


def release(folder: OutputFolder, token: str) -> None:
    url = lease_url(folder)
    _HELD.pop(url, None)
    holder = _read(folder)
    if holder is not None and holder.get("token") == token:
        folder.remove(url)


def _create(folder: OutputFolder, url: str, body: bytes) -> bool:
    """Create `url` with `body` unless it exists; True if this call created it."""
    try:
        return _create_exclusive(folder, url, body)
    except SageError:
        raise
    except OSError as e:  # 403, a read-only disk...: one line, not a traceback
        raise StorageError(f"cannot create the lease {url}: {storage_reason(e)}") from e


def _create_exclusive(folder: OutputFolder, url: str, body: bytes) -> bool:
    fs, path = filesystem(normalize_url(url), folder.storage_options)
    if "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        fsync_folder(os.path.dirname(path))
        return True
    try:
        with fs.open(path, "xb") as f:  # s3fs: put with If-None-Match: *
            f.write(body)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no exclusive create on this store
        log.warning("%s cannot create a file exclusively: the lease is look-then-write", url)
        if folder.exists(url):
            return False
        folder.write_bytes(url, body)
        return True


def _read(folder: OutputFolder) -> dict[str, Any] | None:
    try:
        with folder.open(lease_url(folder)) as f:
            found = json.loads(f.read() or b"{}")
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # being written this instant, or not ours: an unknown holder
        return {}
    return found if isinstance(found, dict) else {}


def _dead_here(holder: dict[str, Any] | None) -> bool:
    """Whether the holder is a process on this host that no longer exists."""
    if not holder or holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return lease_token_unknown(holder)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def lease_token_unknown(holder: dict[str, Any]) -> bool:
    """Our own pid but not a lease this process holds: left by an earlier life of this pid."""
    return holder.get("token") not in _HELD.values()


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "no lease"
    if not holder:
        return f"holder unknown: {LEASE} is empty or unreadable"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since "
            f"{holder.get('started')}")  # fmt: skip
