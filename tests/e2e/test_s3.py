"""Object storage end to end, against a real S3-protocol server (moto) on 127.0.0.1.

The reference for every S3 run is the same run on local files: outputs must match byte for
byte (the manifest after replacing the input prefix). Faults are injected by the ``s3_proxy``
fixture (conftest.py) between s3fs and the server, with s3fs's and botocore's own retries
turned off, so what survives them is sage-stream's retry layer alone.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from paths import HELPERS
from shardmaker import digit_samples, make_parquet_shard, tar_bytes
from tiny import blobs, train_checkpoint, write_tar_set

import sage_stream
from sage_stream.errors import ShardError
from sage_stream.formats import copy_selected, read_parquet, read_tar
from sage_stream.sample import ShardRef
from sage_stream.storage import atomic_write, filesystem
from sage_stream.storage import fs as storage

s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.s3

N = 90
OPTIONS = dict(model="tiny:mlp", ell=16, batch_size=32, device="cpu", keep=0.5, progress=False)
TESTS = HELPERS  # the cwd of CLI subprocesses: `tiny:mlp` imports there


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Inputs and checkpoint under one local root, and the run on them: the reference."""
    root = tmp_path_factory.mktemp("local")
    x, _, noisy = blobs(N, seed=3)
    write_tar_set(root / "in", x, noisy, shards=3)
    train_checkpoint(root / "proxy.pt", x, noisy, steps=60)
    out = root / "out"
    sage_stream.run(str(root / "in"), out=str(out), checkpoint=str(root / "proxy.pt"), **OPTIONS)
    return root, out


def upload(local_root: Path, bucket: str) -> None:
    fs = s3fs.S3FileSystem()
    for path in sorted(local_root.rglob("*")):
        rel = path.relative_to(local_root)
        if path.is_file() and rel.parts[0] != "out":
            fs.pipe(f"{bucket}/{rel.as_posix()}", path.read_bytes())


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def s3_files(url: str, storage_options: dict | None = None) -> dict[str, bytes]:
    fs, root = filesystem(url, storage_options)
    fs.invalidate_cache()
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def assert_same_outputs(got: dict[str, bytes], want: dict[str, bytes], prefixes: tuple) -> None:
    """Every output byte-identical; manifest.json equal once input prefixes are swapped."""
    assert sorted(got) == sorted(want)
    assert "_SUCCESS" in got and any(name.startswith("sketch.zarr/") for name in got)
    differing = [n for n in want if n != "manifest.json" and got[n] != want[n]]
    assert differing == []
    old, new = prefixes
    manifest = json.loads(got["manifest.json"].decode().replace(old, new))
    expected = json.loads(want["manifest.json"])
    for m in (manifest, expected):  # names of storage options (endpoint, ...) are recorded
        m["config"].pop("storage_options")
        pins = m["identity"].pop("pins")  # size + ETag on S3, size + mtime on a local disk
        assert all(p.startswith("size=") for p in pins)
    assert manifest == expected


def leftovers(bucket: str) -> tuple[list[str], list[str]]:
    """Temporary objects and unfinished multipart uploads left in a bucket."""
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    name = bucket.removeprefix("s3://")
    tmp = [p for p in fs.find(name) if "/_work/tmp/" in p or p.endswith(".partial")]
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=name).get("Uploads", [])
    return tmp, [u["Key"] for u in uploads]


# --- whole runs --------------------------------------------------------------------------


def test_run_on_s3_is_byte_identical_to_the_local_run(local, s3_bucket):
    root, out = local
    upload(root, s3_bucket)
    result = sage_stream.run(
        f"{s3_bucket}/in", out=f"{s3_bucket}/out", checkpoint=f"{s3_bucket}/proxy.pt", **OPTIONS
    )
    assert result.emit.totals["seen"] == N
    got = s3_files(f"{s3_bucket}/out")
    assert_same_outputs(got, local_files(out), (s3_bucket, str(root)))
    assert leftovers(s3_bucket) == ([], [])


@pytest.mark.slow
def test_cli_run_on_s3_with_storage_option_endpoint(local, s3_bucket, s3):
    root, out = local
    upload(root, s3_bucket)
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}  # only the flag
    cmd = [sys.executable, "-m", "sage_stream", "run", f"{s3_bucket}/in/part-{{000..002}}.tar"]
    cmd += ["--model", "tiny:mlp", "--checkpoint", f"{s3_bucket}/proxy.pt"]
    cmd += ["--out", f"{s3_bucket}/cli", "--keep", "0.5", "--ell", "16", "--batch-size", "32"]
    cmd += ["--device", "cpu", "--no-progress", "--storage-option", f"endpoint_url={s3.endpoint}"]
    done = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"seen {N}" in done.stdout
    got = s3_files(f"{s3_bucket}/cli")
    want = local_files(out)
    assert sorted(got) == sorted(want)
    same = [n for n in want if not n.endswith(".json") and got[n] == want[n]]
    assert sorted(same) == sorted(n for n in want if not n.endswith(".json"))
    assert json.loads(got["manifest.json"])["config"]["storage_options"] == ["endpoint_url"]


# --- readers and writers -----------------------------------------------------------------


def test_parquet_reads_and_copies_the_same_from_s3(s3_bucket, tmp_path):
    columns = {"__key__": [f"k{i}" for i in range(50)], "x": [[float(i)] * 3 for i in range(50)]}
    refs = []
    for root in (str(tmp_path), s3_bucket):
        url = make_parquet_shard(f"{root}/a.parquet", columns, row_group_size=8)
        refs.append(ShardRef(url=url, name="a.parquet", format="parquet"))
    local_rows, s3_rows = ([(s.key, s.fields) for s in read_parquet(r)] for r in refs)
    assert s3_rows == local_rows and len(s3_rows) == 50
    keep = {"k3": {"score": 0.5}, "k40": {"score": 0.25}}
    copies = []
    for ref in refs:
        buf = io.BytesIO()
        assert copy_selected(ref, buf, keep) == 2
        copies.append(buf.getvalue())
    assert copies[0] == copies[1]


def test_atomic_write_commits_on_success_including_empty_objects(s3_bucket):
    fs = s3fs.S3FileSystem()
    with atomic_write(f"{s3_bucket}/out/a.bin") as f:
        f.write(b"abc")
    with atomic_write(f"{s3_bucket}/out/_SUCCESS") as f:
        f.write(b"")
    with atomic_write(f"{s3_bucket}/out/a.bin") as f:  # replaces
        f.write(b"second")
    fs.invalidate_cache()
    assert fs.cat(f"{s3_bucket}/out/a.bin") == b"second"
    assert fs.cat(f"{s3_bucket}/out/_SUCCESS") == b""
    assert leftovers(s3_bucket) == ([], [])


def test_failure_mid_write_on_s3_leaves_no_object(s3_bucket):
    fs = s3fs.S3FileSystem()
    url = f"{s3_bucket}/out/big.tar"
    parts = {"default_block_size": 5 * 2**20}  # S3's smallest part, so one goes up early
    with pytest.raises(RuntimeError, match="writer died"), atomic_write(url, parts) as f:
        f.write(os.urandom(6 * 2**20))
        f.flush()
        assert leftovers(s3_bucket)[1] == ["out/big.tar"]  # a part is up, nothing visible
        assert not fs.exists(url)
        raise RuntimeError("writer died")
    fs.invalidate_cache()
    assert not fs.exists(url)
    assert leftovers(s3_bucket) == ([], [])


def test_missing_and_forbidden_objects_are_shard_errors_naming_the_url(s3_bucket, s3_deny_get):
    url = f"{s3_bucket}/in/a.tar"
    s3fs.S3FileSystem().pipe(url, tar_bytes(digit_samples(2)))
    with pytest.raises(ShardError, match=r"does not exist \(404") as info:
        list(read_tar(ShardRef(f"{s3_bucket}/in/gone.tar", "gone.tar", "tar")))
    assert f"{s3_bucket}/in/gone.tar" in str(info.value)
    s3_deny_get(s3_bucket, "in/a.tar")
    with pytest.raises(ShardError, match=r"access denied \(403\)") as info:
        list(read_tar(ShardRef(url, "a.tar", "tar")))
    assert str(info.value).startswith(url) and "\n" not in str(info.value)


def test_shard_reads_are_ranged_and_bounded(s3_bucket, s3_proxy, monkeypatch):
    samples = {f"s{i:03d}": {"bin": os.urandom(20_000), "cls": b"1"} for i in range(100)}
    data = tar_bytes(samples)  # ~2.2 MB
    s3fs.S3FileSystem().pipe(f"{s3_bucket}/in/big.tar", data)
    monkeypatch.setattr(storage, "READ_BLOCK_BYTES", 256 * 2**10)
    options = {"endpoint_url": s3_proxy.endpoint}
    ref = ShardRef(f"{s3_bucket}/in/big.tar", "big.tar", "tar")
    got = [s.fields for s in read_tar(ref, options)]
    assert got == list(samples.values())
    gets = [r for method, path, r in s3_proxy.requests if method == "GET" and "big.tar" in path]
    sizes = [int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in gets)]
    assert len(sizes) >= len(data) // (512 * 2**10) and max(sizes) <= 512 * 2**10
    assert sum(sizes) < 2 * len(data)  # read once, in blocks: never the whole object at once


# --- transient faults --------------------------------------------------------------------


def ours(method: str, path: str) -> bool:
    """Requests that sage-stream's retry layer covers (other ones keep s3fs's own retries).

    Inputs: listing, HEAD and ranged GETs. Outputs: the commit of each upload (parts and
    the zarr store are written by s3fs and zarr, which retry on their own in production).
    """
    if "/in/" in path or "prefix=in" in path:
        return True
    return method == "POST" and "uploadId=" in path and "sketch.zarr" not in path


def once_each(kinds: list[str]) -> Callable[[str, str], str | None]:
    """A plan that faults the first of each distinct request of ours, cycling through kinds."""
    seen: set[tuple[str, str]] = set()
    cycle = itertools.cycle(kinds)

    def plan(method: str, path: str) -> str | None:
        if not ours(method, path) or (method, path) in seen:
            return None
        seen.add((method, path))
        if (
            method == "GET"
            and "/in/" in path
            and not any("/in/" in p for m, p in seen - {(method, path)} if m == "GET")
        ):
            return "reset"  # the first shard read always breaks mid-stream
        return next(cycle)

    return plan


@pytest.fixture
def no_client_retries(monkeypatch):
    """s3fs and botocore give up at the first error: only sage-stream's retries are left."""
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv("SAGE_STREAM_RETRY_DELAY", "0.01")
    s3fs.S3FileSystem.clear_instance_cache()
    return {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


KINDS = ["reset", "slowdown", "reset-early", "internal"]


@pytest.mark.slow
def test_run_survives_resets_and_throttling_with_identical_outputs(
    local, s3_bucket, s3_proxy, no_client_retries
):
    root, out = local
    upload(root, s3_bucket)
    s3_proxy.plan = once_each(KINDS)
    options = {**no_client_retries, "endpoint_url": s3_proxy.endpoint}
    sage_stream.run(
        f"{s3_bucket}/in",
        out=f"{s3_bucket}/out",
        checkpoint=f"{s3_bucket}/proxy.pt",
        storage_options=options,
        **OPTIONS,
    )
    assert {kind: s3_proxy.injected(kind) >= 1 for kind in KINDS} == dict.fromkeys(KINDS, True)
    assert any(m == "GET" and "/in/" in p for f, m, p in s3_proxy.faults if f == "reset")
    got = s3_files(f"{s3_bucket}/out")
    assert_same_outputs(got, local_files(out), (s3_bucket, str(root)))
    assert leftovers(s3_bucket) == ([], [])


def test_without_retries_the_same_faults_fail_the_read(
    s3_bucket, s3_proxy, no_client_retries, monkeypatch
):
    url = f"{s3_bucket}/in/a.tar"
    s3fs.S3FileSystem().pipe(url, tar_bytes(digit_samples(3)))
    s3_proxy.plan = once_each(["slowdown"])
    monkeypatch.setenv("SAGE_STREAM_RETRY_ATTEMPTS", "1")
    options = {**no_client_retries, "endpoint_url": s3_proxy.endpoint}
    with pytest.raises(ShardError, match=r"Service Unavailable \(gave up after 1 try\)") as info:
        list(read_tar(ShardRef(url, "a.tar", "tar"), options))
    assert str(info.value).startswith(url) and s3_proxy.injected("slowdown") == 1


@pytest.mark.slow
def test_failed_run_leaves_no_success_and_no_partial_object(
    local, s3_bucket, s3_proxy, no_client_retries
):
    root, _ = local
    upload(root, s3_bucket)
    broken = "out/shards/part-001.tar?uploadId="

    def plan(method: str, path: str) -> str | None:
        return "internal" if method == "POST" and broken in path else None

    s3_proxy.plan = plan
    options = {**no_client_retries, "endpoint_url": s3_proxy.endpoint}
    with pytest.raises(OSError, match="internal error"):
        sage_stream.run(
            f"{s3_bucket}/in",
            out=f"{s3_bucket}/out",
            checkpoint=f"{s3_bucket}/proxy.pt",
            storage_options=options,
            **OPTIONS,
        )
    assert s3_proxy.injected("internal") == 5  # the default policy: 5 tries
    names = s3_files(f"{s3_bucket}/out")
    assert "_SUCCESS" not in names and "shards/part-001.tar" not in names
    with tarfile.open(fileobj=io.BytesIO(names["shards/part-000.tar"])) as tf:
        assert tf.getmembers()  # the shard before the failure is whole
    assert leftovers(s3_bucket) == ([], [])


# --- one writer per output (OUT/_LEASE as a conditional put) -----------------------------


def test_lease_on_s3_is_an_exclusive_put(s3_bucket):
    """s3fs's mode "xb" is a put with If-None-Match: *; the server refuses the second one."""
    from sage_stream.errors import OutputLockedError
    from sage_stream.outputs import lease
    from sage_stream.outputs.folder import OutputFolder

    folder = OutputFolder(f"{s3_bucket}/out")
    with lease.hold(folder):
        assert not lease._create(folder, lease.lease_url(folder), b"{}")  # refused by S3
        with pytest.raises(OutputLockedError, match=r"is being written by another run \(host"):
            lease.acquire(folder)
        lease.check(folder)
    assert not storage.exists(lease.lease_url(folder))
