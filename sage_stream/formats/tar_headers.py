"""Bounded tar header parsing: the guard between ``tarfile`` and an untrusted shard.

``formats.tar`` reads shards with ``tarfile`` in stream mode through ``CheckedTarInfo``, which
makes sure that no header value decides how much work or memory a shard costs:

- Every header that ``tarfile`` would read whole into memory (a pax extended header, a GNU
  long name or long link) is bounded by ``MAX_HEADER_BYTES`` before it is read. An oversized
  one is streamed past unread and the member it describes comes out with ``sage_error`` set,
  so its sample becomes an error row; an oversized *global* pax header (which would rename
  every member after it) or sparse map ends the shard. At most ``MAX_HEADER_CHAIN`` extended
  headers may precede one member (a long chain would otherwise recurse until the stack ends).
- pax records are parsed here in one linear scan, strictly (the stdlib's parser of Python
  3.11 backtracks quadratically on some inputs and silently stops at a malformed record).
- Sparse maps are never parsed or expanded: ``formats.tar`` never reads a sparse member, so
  the member is only marked sparse (``sparse == []``).
- ``skip_member_data`` moves the stream past a member that is not read by *reading* the bytes
  that are there, never by the claimed size: a member that claims more than the stream holds
  ends the shard at the stream's end (``tarfile``'s own stream-mode skip spins through the
  whole claim, 30 minutes for a 10^12 byte claim).
- The common header (every number plain octal, the unsigned checksum right, not sparse) is
  parsed by ``CheckedTarInfo.frombuf`` in one unpack; it gives the same ``TarInfo`` as
  ``tarfile``'s own ``frombuf`` (``tests/formats/test_tar_headers.py`` compares them on
  fuzzed blocks), and every other block (base-256 numbers, a signed checksum, an odd field,
  a zero or short block) goes to ``tarfile``'s, so no bound or error changes. It is there for
  speed: tarfile's per-field parsing was 7.7 of 33 s of a profiled run (docs/benchmarks.md §8).
  ``read_member_data`` reads a member's (size-checked) data straight from the stream, without
  the two file objects per member of ``extractfile``.
- Whatever else a malformed header makes ``tarfile`` raise (``ValueError`` from a number,
  ``IndexError`` from a short block, ...) becomes a header error, so the reader reports it as
  a corrupt shard instead of crashing.

For writing, ``plain_header`` builds the header block of an output member the way
``TarFile.addfile`` does in PAX format, where no pax header is needed (the bytes are tested
equal to tarfile's); anything else is written by tarfile.

The stream-end bookkeeping (``sage_end``: why the headers stopped) is explained in
``CheckedTarInfo.fromtarfile``.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from typing import Any, Self

# One pax extended header or GNU long name/link. Real ones hold a path and a few numbers
# (PATH_MAX is 4 KiB); 1 MiB leaves room for extended attributes and still bounds memory.
MAX_HEADER_BYTES = 2**20
# Extended headers in front of one member: a global, an extended, a long name and a long link
# make four; more is a hostile chain.
MAX_HEADER_CHAIN = 8
_CHUNK = 2**20  # bytes per read when streaming past data
# What may follow the end-of-archive marker: the second zero block and the record's padding
# (tar writers pad to 10 KiB records; more than this many zero bytes is not read).
_TRAILER_BYTES = 20 * tarfile.RECORDSIZE
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
# A ustar header block: name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic,
# version, uname, gname, devmajor, devminor, prefix (and 12 bytes of padding).
_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s")
# Errors that tarfile's own header code lets escape on malformed input.
# Number fields seen before (raw field bytes -> value, -1 if not plain octal): most repeat
# from header to header (mode, owner, mtime, devices; sizes within a dataset), and a lookup is
# a fifth of the strip-check-convert. Cleared when full, so a shard cannot grow it.
_OCTAL_FIELDS: dict[bytes, int] = {}
_OCTAL_FIELDS_MAX = 4096
_PARSE_ERRORS = (ValueError, IndexError, OverflowError, LookupError, TypeError, RecursionError)


class CheckedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` whose header processing is bounded; see the module docstring.

    ``sage_error`` is why the member's sample must be an error row (None if it may be read).
    """

    sage_error: str | None = None

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        """The next member, recording in ``tarfile_.sage_end`` why the header stream ended.

        In stream mode tarfile treats an empty, short or corrupt header after the first member
        as a normal end of archive, so a shard cut at a member boundary would look complete.
        Only a zero block (the end-of-archive marker) followed by nothing but zeros is a clean
        end; anything else is truncation, and a zero block with data after it is a zeroed header.
        """
        tf: Any = tarfile_
        depth = getattr(tf, "sage_depth", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]  # private
                f"more than {MAX_HEADER_CHAIN} extended headers in front of one member"
            )
        tf.sage_depth = depth + 1
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # type: ignore[attr-defined]  # private, not in typeshed
            if depth == 0:
                tf.sage_end = _after_end_marker(tarfile_)
            raise
        except tarfile.EmptyHeaderError:  # type: ignore[attr-defined]  # as above
            if depth == 0:
                tf.sage_end = "missing end-of-archive marker"
            raise
        except tarfile.HeaderError as e:
            tf.sage_end = f"bad member header: {e}"
            raise
        except _PARSE_ERRORS as e:
            tf.sage_end = f"bad member header: {type(e).__name__}: {e}"
            raise tarfile.InvalidHeaderError(tf.sage_end) from e  # type: ignore[attr-defined]
        finally:
            tf.sage_depth = depth

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        """``tarfile.TarInfo.frombuf``, with the common header parsed in one go (see the module
        docstring); anything else is ``tarfile``'s."""
        parsed = _common_header(buf) if len(buf) == tarfile.BLOCKSIZE else None
        if parsed is None:
            return super().frombuf(buf, encoding, errors)
        text, numbers, kind = parsed
        # tarfile's nts: up to the first NUL
        name, linkname, uname, gname, prefix = (
            t.split(b"\0", 1)[0].decode(encoding, errors) for t in text
        )
        obj = cls()
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum = numbers[:6]
        obj.devmajor, obj.devminor = numbers[6:]
        obj.type, obj.linkname, obj.uname, obj.gname = kind, linkname, uname, gname
        # What tarfile's frombuf does after the fields, in its order.
        if kind == tarfile.AREGTYPE and name.endswith("/"):  # a V7 directory
            obj.type = tarfile.DIRTYPE
        if obj.isdir():
            name = name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:  # a ustar long name
            name = prefix + "/" + name
        obj.name = name
        return obj

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        what = "long name" if self.type == tarfile.GNUTYPE_LONGNAME else "long link"
        if not 0 <= self.size <= MAX_HEADER_BYTES:
            return self._skip_header(tarfile_, f"a GNU {what} header of {self.size} bytes")
        return super()._proc_gnulong(tarfile_)  # type: ignore[misc]  # private

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """A GNU sparse member (type S): its extension blocks are read past, never parsed."""
        _, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]  # frombuf
        del self._sparse_structs  # type: ignore[attr-defined]
        fileobj: Any = tarfile_.fileobj
        blocks = 0
        while isextended:
            buf = fileobj.read(tarfile.BLOCKSIZE)
            blocks += 1
            if len(buf) < tarfile.BLOCKSIZE or blocks * tarfile.BLOCKSIZE > MAX_HEADER_BYTES:
                raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]
                    "a truncated or oversized GNU sparse map"
                )
            isextended = bool(buf[504])
        _mark_sparse(self)
        self.offset_data = fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """A pax extended (or global) header, parsed strictly, then the member it describes."""
        tf: Any = tarfile_
        is_global = self.type == tarfile.XGLTYPE
        if not 0 <= self.size <= MAX_HEADER_BYTES:
            if is_global:
                raise tarfile.InvalidHeaderError(  # type: ignore[attr-defined]
                    f"a global pax header of {self.size} bytes, over the limit of "
                    f"{MAX_HEADER_BYTES}"
                )
            return self._skip_header(tarfile_, f"a pax extended header of {self.size} bytes")
        buf = tf.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
        pax_headers = tf.pax_headers if is_global else tf.pax_headers.copy()
        charset = pax_headers.get("hdrcharset")  # a global header's holds for what follows
        pax_headers.update(self._pax_fields(buf[: self.size], tarfile_, charset))
        nxt = self._next_header(tarfile_)
        if any(name.startswith("GNU.sparse.") for name in pax_headers):
            _mark_sparse(nxt)
        if not is_global:
            nxt._apply_pax_info(pax_headers, tf.encoding, tf.errors)  # type: ignore[attr-defined]
            nxt.offset = self.offset
            if "size" in pax_headers:  # the member's data ends elsewhere than its header said
                offset = nxt.offset_data
                if nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES:
                    offset += nxt._block(nxt.size)  # type: ignore[attr-defined]
                tf.offset = offset
        return nxt

    def _pax_fields(
        self, buf: bytes, tarfile_: tarfile.TarFile, charset: str | None = None
    ) -> dict[str, str]:
        """The records ``"<length> <keyword>=<value>\\n"`` of a pax header, decoded.

        One linear pass; a record whose framing is wrong is an error (as in Python 3.12+).
        """
        raw: list[tuple[bytes, bytes]] = []
        own: bytes | None = None  # this header's hdrcharset: it wins over a global one
        pos = 0
        while pos < len(buf) and buf[pos] != 0:
            match = _PAX_LENGTH.match(buf, pos)
            length = int(match.group(1)) if match else 0
            end = pos + length - 1  # the record's newline
            if length < 5 or end >= len(buf) or buf[end] != 0x0A:
                raise tarfile.InvalidHeaderError("a malformed pax record")  # type: ignore[attr-defined]
            keyword, equals, value = buf[match.end() : end].partition(b"=")  # type: ignore[union-attr]
            if not keyword or not equals:
                raise tarfile.InvalidHeaderError("a malformed pax record")  # type: ignore[attr-defined]
            if keyword == b"hdrcharset" and own is None:
                own = value
            raw.append((keyword, value))
            pos += length
        binary = own == b"BINARY" if own is not None else charset == "BINARY"
        encoding = tarfile_.encoding if binary else "utf-8"
        decode: Any = self._decode_pax_field  # type: ignore[attr-defined]  # private
        fields = {}
        for keyword, value in raw:
            name = decode(keyword, "utf-8", "utf-8", tarfile_.errors)
            if name in tarfile.PAX_NAME_FIELDS:
                fields[name] = decode(value, encoding, tarfile_.encoding, tarfile_.errors)
            else:
                fields[name] = decode(value, "utf-8", "utf-8", tarfile_.errors)
        return fields

    def _next_header(self, tarfile_: tarfile.TarFile) -> CheckedTarInfo:
        try:
            return self.fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None  # type: ignore[attr-defined]

    def _skip_header(self, tarfile_: tarfile.TarFile, what: str) -> tarfile.TarInfo:
        """Stream past an oversized extended header; the member after it is an error."""
        if self.size < 0:
            raise tarfile.InvalidHeaderError(f"{what}: a negative size")  # type: ignore[attr-defined]
        skip_bytes(tarfile_, self._block(self.size), what)  # type: ignore[attr-defined]
        nxt = self._next_header(tarfile_)
        nxt.offset = self.offset
        nxt.sage_error = f"{what}, over the limit of {MAX_HEADER_BYTES}: not read"
        return nxt


def skip_bytes(tarfile_: tarfile.TarFile, count: int, what: str) -> None:
    """Read and drop ``count`` bytes of the stream; ReadError if it ends first.

    The work is bounded by the bytes the stream really holds, whatever ``count`` claims.
    """
    fileobj: Any = tarfile_.fileobj
    done = 0
    while done < count:
        got = len(fileobj.read(min(count - done, _CHUNK)))
        if got == 0:
            raise tarfile.ReadError(
                f"unexpected end of data {done} bytes into {what}, which claims {count} bytes"
            )
        done += got


def read_member_data(tarfile_: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """The data of a regular, non-sparse member whose size the caller has bounded.

    What ``tarfile_.extractfile(info).read()`` returns, read from the stream in one call
    instead of through a file object per member; ReadError if the stream ends first.
    """
    fileobj: Any = tarfile_.fileobj
    if fileobj.tell() != info.offset_data:  # after a header the stream is at its data
        fileobj.seek(info.offset_data)
    data = fileobj.read(info.size)
    if len(data) != info.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def skip_member_data(tarfile_: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    """Move the stream to the next header past the (unread or read) data of ``info``."""
    tf: Any = tarfile_
    remaining = tf.offset - tf.fileobj.tell()
    if remaining < 0:
        raise tarfile.ReadError(f"member {info.name!r} claims a negative size ({info.size})")
    skip_bytes(tarfile_, remaining, f"member {info.name!r}")


def _common_header(buf: bytes | bytearray) -> tuple[tuple[bytes, ...], list[int], bytes] | None:
    """(name, linkname, uname, gname, prefix as bytes; mode, uid, gid, size, mtime, chksum,
    devmajor, devminor; typeflag) of a 512-byte header block in the common form, else None.

    The common form: every number field plain octal (digits, then only spaces and NULs), the
    checksum equal to the unsigned sum, and not a GNU sparse header (whose extra fields only
    tarfile parses).
    """
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, _magic, _version, uname,
     gname, devmajor, devminor, prefix) = _USTAR.unpack_from(buf)  # fmt: skip
    numbers = []
    known = _OCTAL_FIELDS
    for raw in (mode, uid, gid, size, mtime, chksum, devmajor, devminor):
        number = known.get(raw)
        if number is None:
            number = _plain_octal(raw)
            if len(known) >= _OCTAL_FIELDS_MAX:  # bounded whatever a shard's headers hold
                known.clear()
            known[raw] = number
        if number < 0:
            return None
        numbers.append(number)
    # tarfile accepts the unsigned or the signed sum; only the unsigned one is taken here
    if kind == tarfile.GNUTYPE_SPARSE or numbers[5] != 256 + _byte_sum(buf) - sum(buf[148:156]):
        return None
    return (name, linkname, uname, gname, prefix), numbers, kind


def count_plain(f: Any, suffix: bytes) -> int | None:
    """Members of an uncompressed tar whose name ends with `suffix`, by walking its headers and
    seeking over the data, as tarfile counts them (up to the first all-NUL block); None as
    soon as a header is not a plain one (a regular file in the common form, no ustar prefix,
    no PAX or GNU header), for an archive without members, or if the file ends early: then
    tarfile must count it (or refuse it)."""
    count, empty = 0, bytes(512)
    while True:
        block = f.read(512)
        if block == empty:
            return count if count else None
        parsed = _common_header(block) if len(block) == 512 else None
        if parsed is None or parsed[2] not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            return None
        (name, *_, prefix), numbers, _kind = parsed
        name = name.split(b"\0", 1)[0]
        if prefix[:1] not in (b"", b"\0") or name.endswith(b"/"):  # a long name, a V7 folder
            return None
        count += name.endswith(suffix)
        f.seek(f.tell() + -(-numbers[3] // 512) * 512)


def _plain_octal(raw: bytes) -> int:
    """tarfile's nti in the common case (octal digits, then only spaces and NULs), else -1."""
    digits = raw.rstrip(b" \0")
    if digits.translate(None, b"01234567"):  # anything else goes to tarfile's path
        return -1
    return int(digits or b"0", 8)


def _byte_sum(buf: bytes | bytearray) -> int:
    """sum(buf) of a 512-byte block, 8x faster: Adler-32's low half is 1 + the byte sum
    modulo 65521, exact for 256 bytes (at most 65,280)."""
    view = memoryview(buf)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def plain_header(name: str, size: int, mtime: float, mode: int) -> bytes | None:
    """The header block ``TarFile.addfile`` writes in PAX format for a regular file with
    owner 0/"" and no pax header; None where it would need one (a name that is not ASCII or
    over 100 bytes, a float or out-of-range number): those go through tarfile.

    The output shards' headers, built without tarfile's per-field encoding (a third of emit).
    """
    if type(size) is not int or type(mtime) is not int or type(mode) is not int:
        return None
    if not (name.isascii() and len(name) <= 100 and 0 <= size < 8**11 and 0 <= mtime < 8**11):
        return None
    block = b"".join((
        name.encode("ascii").ljust(100, b"\0"),
        b"%07o\0" % (mode & 0o7777),
        b"0000000\0" * 2,  # uid, gid
        b"%011o\0%011o\0" % (size, mtime),
        b" " * 8,  # the checksum, as spaces while it is summed
        tarfile.REGTYPE,
        b"\0" * 100,  # linkname
        tarfile.POSIX_MAGIC,
        b"\0" * (32 + 32 + 8 + 8 + 155 + 12),  # uname, gname, devices, prefix, padding
    ))  # fmt: skip
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


def _mark_sparse(info: tarfile.TarInfo) -> None:
    """Make ``info.issparse()`` true without a map: sparse members are never expanded."""
    member: Any = info  # typeshed types ``sparse`` as bytes
    member.sparse = []


def _after_end_marker(tf: tarfile.TarFile) -> str | None:
    """None if only zeros follow the zero block that ended the headers, else why not."""
    trailer = tf.fileobj.read(_TRAILER_BYTES) if tf.fileobj is not None else b""
    if trailer.strip(b"\0"):
        return "a zeroed member header with data after it (corrupt shard)"
    return None
