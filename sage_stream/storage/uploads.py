"""Multipart uploads that a killed writer left open under an output folder (S3).

``atomic_write`` writes to S3 as a multipart upload that is invisible until committed and
aborted on any error; a process killed mid-write (SIGKILL, a lost node) cannot abort it, and
S3 keeps (and bills) its parts until a bucket lifecycle rule removes them. Under OUT's lease
no other writer of OUT exists, so every upload still open under OUT's prefix when a step takes
the lease, or when the run commits, belongs to a dead writer of this output: it is aborted.
Uploads elsewhere in the bucket are never touched. Other stores have nothing to do here
(local and memory writes go through temporaries that ``remove_temporaries`` clears; GCS
resumable uploads expire by themselves after a week).
"""

from __future__ import annotations

import logging
from typing import Any

from sage_stream.storage.fs import filesystem, normalize_url
from sage_stream.storage.retry import call, error_text

log = logging.getLogger("sage_stream")
_S3 = frozenset({"s3", "s3a"})


def abort_stale_uploads(url: str, storage_options: dict | None = None) -> int:
    """Abort every open multipart upload under folder ``url``; returns how many.

    Best effort: a store that refuses the listing (no ``s3:ListBucketMultipartUploads``)
    gets a warning, and the run goes on.
    """
    fs, path = filesystem(normalize_url(url), storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & _S3:
        return 0
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    try:
        uploads = list(_open_uploads(fs, bucket, prefix))
        for key, upload_id in uploads:
            call(fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=key,
                 UploadId=upload_id, what=f"abort the upload of s3://{bucket}/{key}")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - clean-up: the run's own result matters more
        log.warning("could not abort stale multipart uploads under %s: %s; a bucket lifecycle "
                    "rule for incomplete multipart uploads removes them", url, error_text(exc))  # fmt: skip
        return 0
    if uploads:
        log.info("aborted %d multipart upload(s) left open under %s by a killed writer",
                 len(uploads), url)  # fmt: skip
    return len(uploads)


def _open_uploads(fs: Any, bucket: str, prefix: str) -> Any:
    """``(key, upload id)`` of the uploads open under ``prefix``, page by page."""
    marker: dict[str, Any] = {}
    while True:
        page = call(fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix,
                    what=f"list multipart uploads under s3://{bucket}/{prefix}", **marker)  # fmt: skip
        for upload in page.get("Uploads", []):
            yield upload["Key"], upload["UploadId"]
        if not page.get("IsTruncated"):
            return
        marker = {"KeyMarker": page["NextKeyMarker"],
                  "UploadIdMarker": page["NextUploadIdMarker"]}  # fmt: skip
