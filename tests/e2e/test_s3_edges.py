"""Storage edges on S3 (issue 25, defect 5), against moto on 127.0.0.1 (conftest ``s3``).

1. Multipart uploads that a killed writer left open under OUT are aborted when a step takes
   OUT's lease (a resume) and when the run commits; uploads elsewhere in the bucket stay.
2. The OUT bucket deleted while a pass-1 checkpoint is removed is one StorageError line.
"""

from __future__ import annotations

import pytest
from tiny import blobs, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.errors import StorageError
from sage_stream.storage import fs as storage

s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.s3

OPTIONS = dict(model="tiny:mlp", ell=8, batch_size=32, device="cpu", progress=False)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    x, _, noisy = blobs(60)
    return write_tar_set(root / "in", x, noisy, shards=2), train_checkpoint(root / "p.pt", x, noisy)


def open_upload(bucket: str, key: str) -> None:
    """A multipart upload with one part, never completed: what a SIGKILLed emit leaves."""
    client = boto3.client("s3")
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                       Body=b"x" * 1024)  # fmt: skip


def open_keys(bucket: str) -> list[str]:
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return sorted(u["Key"] for u in uploads)


def test_stale_uploads_under_out_are_aborted_on_resume_and_commit(job, s3_bucket):
    urls, ckpt = job
    bucket = s3_bucket.removeprefix("s3://")
    open_upload(bucket, "out/shards/part-000.tar")
    open_upload(bucket, "out2/shards/part-000.tar")  # another output: not this run's
    open_upload(bucket, "data/big.tar")
    out = f"{s3_bucket}/out"
    sage_stream.sketch(urls, out=out, checkpoint=ckpt, **OPTIONS)  # takes the lease: a resume
    assert open_keys(bucket) == ["data/big.tar", "out2/shards/part-000.tar"]
    open_upload(bucket, "out/scores/part-part-001.tar.parquet")  # a writer killed after that
    sage_stream.run(urls, out=out, checkpoint=ckpt, keep=0.5, **OPTIONS)
    assert open_keys(bucket) == ["data/big.tar", "out2/shards/part-000.tar"]
    assert s3fs.S3FileSystem().exists(f"{out}/_SUCCESS")


def test_the_out_bucket_deleted_under_a_checkpoint_removal_is_one_storage_error(
    job, s3_bucket, monkeypatch
):
    urls, ckpt = job
    real, gone = storage.exists, []

    def exists_then_the_bucket_goes(url, storage_options=None):
        found = real(url, storage_options)
        if "pass1-unit-" in url and found and not gone:  # between the check and the removal
            gone.append(url)
            bucket = boto3.resource("s3").Bucket(s3_bucket.removeprefix("s3://"))
            bucket.objects.all().delete()
            bucket.delete()
        return found

    monkeypatch.setattr(storage, "exists", exists_then_the_bucket_goes)
    with pytest.raises(StorageError) as info:
        # checkpoint_every=0: pass 1 saves its checkpoint after every shard, so there is one
        sage_stream.run(urls, out=f"{s3_bucket}/out", checkpoint=ckpt, keep=0.5,
                        checkpoint_every=0, **OPTIONS)  # fmt: skip
    assert gone and str(info.value).startswith(f"cannot remove {gone[0]}: ")
    assert "\n" not in str(info.value)
