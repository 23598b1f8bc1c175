"""Storage, the edge of the flow where bytes meet object storage (fsspec).

    fs       filesystem and URL helpers, bounded resumable reads, all-or-nothing writes
    retry    what counts as transient, backoff, and a reader that resumes at the exact byte
    uploads  S3 multipart uploads a killed writer left open under OUT, aborted under its lease

Everything else in the package reads and writes through these names; nothing else calls
fsspec to open, list or remove a file.
"""

from sage_stream.storage.fs import (
    READ_BLOCK_BYTES,
    atomic_write,
    exists,
    filesystem,
    join,
    list_names,
    normalize_url,
    open_input,
    open_shard,
    pin_of,
    remove,
    storage_reason,
    write_bytes_atomic,
)
from sage_stream.storage.retry import RetryingReader, RetryPolicy, call, error_text, is_transient

__all__ = [
    "READ_BLOCK_BYTES",
    "RetryPolicy",
    "RetryingReader",
    "atomic_write",
    "call",
    "error_text",
    "exists",
    "filesystem",
    "is_transient",
    "join",
    "list_names",
    "normalize_url",
    "open_input",
    "open_shard",
    "pin_of",
    "remove",
    "storage_reason",
    "write_bytes_atomic",
]
