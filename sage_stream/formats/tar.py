"""WebDataset ``.tar`` shards: the reader at the start of the flow and the copier used by emit.

``read_tar`` streams a shard through ``storage.open_shard`` (bounded ranged reads that resume
after a transient storage error; never a local copy, never random access) and groups consecutive
members into samples by webdataset's rule: the key is the member name up to the first dot of
its basename, directory kept (``a/b.seg.png`` -> key ``a/b``, field ``seg.png``); fields are
lower-cased as webdataset does. Members that are skipped, as webdataset skips them: names whose
basename has no dot or starts with a dot (so ``._x.png`` macOS resource forks); ``__*__``
metadata names (``__index__``, ``__meta__/...``). Anything but a regular file (a symlink, a
hard link, a directory, a device) is never read or copied; a key made only of such members
comes out as an error sample, so that every key the shard names is counted.

Shards are untrusted: member names are only split into key and field, never used as paths. A
member larger than ``max_member_bytes``, a sample whose members add up to more than
``max_sample_bytes``, and a sparse member (a few bytes that expand to gigabytes) make their
sample an error row; sizes come from the headers, so the data over a limit is skipped unread
(streamed past, also inside a gzip stream) and the shard goes on. Headers are bounded too
(``tar_headers``): an oversized pax header or GNU long name makes its sample an error row, and
no claimed size is ever skipped by the claim: a member that claims more than the stream holds
ends the shard when the stream ends. A sample with a member
name that a consumer could not extract safely (absolute, a ``..`` component, a backslash or a
NUL) or that is not valid UTF-8 comes out with an error, so it is recorded and never copied;
its key is made writable (invalid bytes as ``\\xff`` escapes). A broken stream never
passes silently: the complete samples before the break come out, then ShardError.

``copy_selected_tar`` re-reads a shard for emit and copies the members of kept samples byte for
byte, adding one ``<key>.sage.json`` member each; it never decodes a payload, and stops reading
once the last kept sample is out. Copied headers are made safe to extract (see ``safe_mode``).
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sage_stream.errors import InputError, ShardError
from sage_stream.formats.tar_headers import (
    CheckedTarInfo,
    plain_header,
    read_member_data,
    skip_member_data,
)
from sage_stream.sample import Sample, ShardRef
from sage_stream.storage.fs import open_shard

SAGE_FIELD = "sage.json"
# webdataset's base_plus_ext, except that a basename starting with a dot never makes a key
_NAME_RE = re.compile(r"^((?:.*/|)[^./][^./]*)[.]([^/]+)$")
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_DRIVE_RE = re.compile(r"^[A-Za-z]:")  # C:evil, C:/evil: absolute on Windows


def writable_text(text: str) -> str:
    """``text`` with what is not valid UTF-8 (surrogates from tarfile) as backslash escapes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def member_name_problem(name: str) -> str | None:
    """Why a member name must not be read or copied (None if it is fine).

    Names that are not valid UTF-8 cannot be written to Parquet or JSON; names that would
    extract outside the consumer's folder (absolute, a ``..`` component, a drive letter) or
    that hide tricks (a backslash, a NUL) would reach every consumer of an output shard.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"member name {writable_text(name)!r} is not valid UTF-8"
    if name.startswith("/") or _DRIVE_RE.match(name) or ".." in name.split("/"):
        return f"unsafe member name {name!r}: an absolute path or a '..' component"
    if "\\" in name or "\0" in name:
        return f"unsafe member name {name!r}: a backslash or NUL in the name"
    return None


def safe_mode(mode: int) -> int:
    """A copied member's mode, as tarfile's ``data`` filter would extract it.

    No setuid, setgid or sticky bit, no group/other write, always owner read/write: 0o644
    and 0o755 stay as they are.
    """
    return (mode | 0o600) & 0o755


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name, or None for a member that is not part of a sample."""
    match = _NAME_RE.match(name)
    if match is None or _META_RE.match(name):
        return None
    return match.group(1), match.group(2).lower()


@dataclass
class _RawSample:
    key: str
    index: int
    members: list[tuple[tarfile.TarInfo, str, bytes | None]] = field(default_factory=list)
    error: str | None = None
    size: int = 0  # bytes of member data read so far
    others: list[str] = field(default_factory=list)  # kinds of its non-file members

    def add(self, info: tarfile.TarInfo, fld: str, data: bytes | None) -> None:
        if self.error is None and any(f == fld for _, f, _ in self.members):
            self.error = f"repeated field {fld}"
        self.members.append((info, fld, data))

    def done(self) -> _RawSample:
        """The sample once complete: a key of links or folders only is an error, so that
        every key the shard names is accounted for (never silently gone)."""
        if not self.members and self.error is None:
            self.error = f"no regular file among its members (only {', '.join(self.others)})"
        return self


_KINDS = {tarfile.SYMTYPE: "a symlink", tarfile.LNKTYPE: "a hard link",
          tarfile.DIRTYPE: "a directory", tarfile.FIFOTYPE: "a FIFO",
          tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device"}  # fmt: skip


def _raw_samples(
    ref: ShardRef,
    storage_options: dict | None,
    max_member_bytes: int,
    wanted: Callable[[str], bool] | None = None,
    max_sample_bytes: int = 512 * 2**20,
) -> Iterator[_RawSample]:
    """Complete samples with their tar headers, in shard order; ShardError on a broken stream.

    Members of samples whose key is not ``wanted`` are skipped unread (data None).
    """
    last_key: str | None = None  # the last sample known complete, for the error message
    pending: _RawSample | None = None
    seen: set[str] = set()
    index = 0
    with open_shard(ref.url, storage_options, pin=ref.pin) as raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r|*", tarinfo=CheckedTarInfo)  # noqa: SIM115
            for info, key, fld in _sample_members(tf):
                if pending is not None and key != pending.key:
                    # A new key proves the previous sample complete: yield it before reading on.
                    last_key = pending.key
                    yield pending.done()
                    pending = None
                if pending is None:
                    pending = _RawSample(
                        key, index, error="duplicate key in shard" if key in seen else None
                    )
                    seen.add(key)
                    index += 1
                if not info.isreg():  # never read nor copied; only its key is counted
                    pending.others.append(_KINDS.get(info.type, "a special file"))
                    continue
                problem = getattr(info, "sage_error", None) or member_name_problem(info.name)
                if problem is not None and pending.error is None:
                    pending.error = problem
                data = None
                if wanted is None or wanted(key):
                    if pending.error is None:
                        pending.error = _size_problem(info, pending, max_member_bytes,
                                                      max_sample_bytes)  # fmt: skip
                    if pending.error is None:
                        data = read_member_data(tf, info)
                        pending.size += len(data)
                pending.add(info, fld, data)
            end = getattr(tf, "sage_end", "missing end-of-archive marker")
            if end is not None:
                raise tarfile.ReadError(end)
        except ShardError as e:  # the stream failed (storage.open_shard) or a member is too big
            raise ShardError(e.url, e.reason, key=e.key or last_key) from e
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            reason = f"truncated or corrupt tar: {' '.join(str(e).split())}"
            raise ShardError(ref.url, reason, key=last_key) from e
    if pending is not None:
        yield pending.done()


def _sample_members(tf: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(header, key, field)`` of the members that belong to samples, in stream order."""
    for info in tf:
        tf.members = []  # type: ignore[attr-defined]  # private; else stream mode keeps every header
        split = split_member_name(info.name)  # links and folders too: their key is counted
        if split is not None:
            yield info, split[0], split[1]
        skip_member_data(tf, info)  # by the bytes there, never by the size the header claims


def _size_problem(
    info: tarfile.TarInfo, sample: _RawSample, member_limit: int, sample_limit: int
) -> str | None:
    """Why this member may not be read (None if it may), from its header alone."""
    if info.size < 0:
        return f"member {info.name!r} claims a negative size ({info.size})"
    if info.issparse():
        return f"member {info.name!r} is a sparse file ({info.size} bytes expanded): not read"
    if info.size > member_limit:
        return (f"member {info.name!r} is {info.size} bytes, over the limit of {member_limit} "
                "(--max-member-bytes)")  # fmt: skip
    if sample.size + info.size > sample_limit:
        return (f"sample's members add up to more than {sample_limit} bytes at "
                f"{info.name!r} (--max-sample-bytes)")  # fmt: skip
    return None


def read_tar(
    ref: ShardRef,
    storage_options: dict | None = None,
    *,
    max_member_bytes: int = 256 * 2**20,
    max_sample_bytes: int = 512 * 2**20,
) -> Generator[Sample, None, None]:
    """Stream the samples of a tar shard: ``fields`` maps field -> raw member bytes.

    A sample whose key appeared earlier in the shard (not consecutively) comes out with
    ``error="duplicate key in shard"``; one with a field twice with ``"repeated field <f>"``
    (first value kept); one with an unsafe or non-UTF-8 member name with why (its key and
    field names made writable, see ``writable_text``), or one over a size limit (see the
    module docstring). The caller records these. Raises ShardError for a shard that cannot
    be opened, or a truncated/corrupt stream (after the
    complete samples before the break; a possibly incomplete last sample is dropped).
    """
    for raw in _raw_samples(ref, storage_options, max_member_bytes,
                            max_sample_bytes=max_sample_bytes):  # fmt: skip
        fields: dict[str, bytes] = {}
        for _, fld, data in raw.members:
            fields.setdefault(fld if raw.error is None else writable_text(fld), data or b"")
        key = raw.key if raw.error is None else writable_text(raw.key)
        yield Sample(key=key, shard=ref.name, fields=fields, index=raw.index, error=raw.error)


class TarShardWriter:
    """Writes samples as a tar stream with reproducible headers; byte-identical for equal input.

    Members are ``<key>.<field>`` in the given field order, mtime 0, mode 0o644, owner 0/"".
    ``close()`` finishes the archive but leaves the file object open. Used as a context
    manager, an exception skips the end-of-archive marker, so a partial shard that did escape
    would be read as truncated rather than complete.
    """

    def __init__(self, fileobj: BinaryIO):
        # Owned by this writer and closed by close(); not a with-block because it spans calls.
        self._tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        for fld, data in fields.items():
            name = f"{key}.{fld}"
            if split_member_name(name) != (key, fld.lower()):
                raise InputError(f"cannot write member {name!r}: key or field would not read back")
            self.write_member(name, data)

    def write_member(self, name: str, data: bytes, like: tarfile.TarInfo | None = None) -> None:
        """Write one regular file member; ``like`` (copying) supplies mtime and mode.

        The owner is always 0/"" and a copied mode goes through ``safe_mode``, so an output
        shard extracts without setuid/setgid bits or foreign owners whatever the input had.
        """
        mtime, mode = (like.mtime, safe_mode(like.mode)) if like is not None else (0, 0o644)
        header = plain_header(name, len(data), mtime, mode)
        if header is None:  # a name or number that needs a pax header: tarfile writes it
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), mtime, mode, 0, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            return
        # the same bytes as addfile: header, data, NULs to the block; offset sets the end pad
        tar: Any = self._tar
        tar.fileobj.write(header)
        stream, view = tar.fileobj, memoryview(data)
        # a record at a time: tarfile's stream appends a write to its buffer, then cuts one
        # record off the front at a time, so one large write costs its size squared (an 8 MB
        # member took 84-100 ms, a 64 MB one 88 s)
        for start in range(0, len(view), stream.bufsize):
            stream.write(view[start : start + stream.bufsize])
        padding = -len(data) % tarfile.BLOCKSIZE
        tar.fileobj.write(b"\0" * padding)
        tar.offset += tarfile.BLOCKSIZE + len(data) + padding

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()


def copy_selected_tar(
    ref: ShardRef,
    out: BinaryIO,
    keep: Mapping[str, bytes],
    storage_options: dict | None = None,
    *,
    max_member_bytes: int = 256 * 2**20,
    max_sample_bytes: int = 512 * 2**20,
) -> int:
    """Copy the kept samples of a shard to ``out``; returns the number of samples written.

    Each sample whose key is in ``keep`` is written with all its members (data byte for byte,
    original names, order and mtime; mode through ``safe_mode``, owner 0) plus
    ``<key>.sage.json`` = ``keep[key]``. An
    existing ``sage.json`` member (a shard that is itself an output) is replaced. Samples the
    reader flags (duplicate key, repeated field, unsafe name) are never copied: the kept copy is the clean
    first occurrence. Reading stops once every kept sample is out (with nothing kept the shard
    is not opened), so a break in the shard after them, which the passes have recorded, does
    not stop emit. Raises ShardError as ``read_tar`` does.
    """
    writer = TarShardWriter(out)
    written = 0
    raws = _raw_samples(ref, storage_options, max_member_bytes, wanted=keep.__contains__,
                        max_sample_bytes=max_sample_bytes)  # fmt: skip
    for raw in raws if keep else ():
        if raw.error is not None or raw.key not in keep:
            continue
        for info, fld, data in raw.members:
            if fld != SAGE_FIELD:
                writer.write_member(info.name, data or b"", like=info)
        writer.write_member(f"{raw.key}.{SAGE_FIELD}", keep[raw.key])
        written += 1
        if written == len(keep):
            break  # the rest of the shard holds nothing to copy
    writer.close()
    return written
