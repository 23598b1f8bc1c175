"""Shared fixtures. Helpers live in ``helpers/`` (on sys.path: ``from tiny import mlp``):
``shardmaker`` makes shards, ``tiny`` tiny data sets and models, ``killer`` decoders that
count or kill, ``paths`` where things are.

Object storage is tested against a real S3-protocol server on loopback, as s3fs tests itself:
``s3`` starts moto's ThreadedMotoServer once per session and points the standard AWS
environment at it; ``s3_bucket`` gives each test an empty bucket and resets the server after.
``s3_proxy`` puts an HTTP proxy between client and server (helpers/faultproxy.py) that can
inject the faults object storage really produces: connection resets part-way through a body,
503 SlowDown, 500.

The suite runs in parallel (pyproject.toml: pytest-xdist's ``-n auto --dist worksteal``; auto
is one worker process per core and one more, `pytest_xdist_auto_num_workers`; ``-n 0`` runs it
in one process). Each worker starts with its share of the tests in their order and takes tests
from the end of another's list when its own runs out, so a module's tests mostly stay in one
worker and its module fixtures are built once. Session fixtures (moto, the Ray cluster) are one
per worker that needs them, and each worker computes on one thread (below). The tests that take
longest run first (`pytest_collection_modifyitems`), so that the workers end together.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from faultproxy import FaultProxy, fault_proxy  # noqa: E402
from paths import environ  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # A worker has a core, not the machine: torch's intra-op threads (and the BLAS threads)
    # of two workers only contend, in this process and in the ones it starts (CLI runs, loader
    # workers, Ray). Set before torch is imported; a test that wants more threads sets them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto`: a worker per core and one more. Much of a worker's time is waiting, not
    computing: for a CLI process or a Ray worker to start (each imports torch), for a Ray
    cluster, a browser, a child's exit; the extra worker computes meanwhile. The variable
    PYTEST_XDIST_AUTO_NUM_WORKERS, when set, decides instead (xdist's own hook)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1


# The modules whose tests take longest, in groups that share a session fixture, with their
# seconds under xdist (setup, call and teardown; three workers, 1,081 tests, a 2-core machine
# shared with another session's work). They run first, each group on one worker: a worker's
# long tests start at once and end early, and the tail of the run is short tests that the
# workers steal from each other.
LONG_GROUPS = {
    ("tests/executors/test_ray.py", "tests/e2e/test_signals.py", "tests/e2e/test_readers.py"): 227,
    ("tests/test_benchmarks.py",): 161,
    ("tests/passes/test_loader.py",): 88,
    ("tests/e2e/test_s3.py",): 62,
    ("tests/e2e/test_resume.py",): 44,
    ("tests/select/test_bounded.py",): 33,
    ("tests/test_demo.py",): 28,
    ("tests/feed/test_feed.py",): 21,
    ("tests/e2e/test_bad_input.py",): 19,
    ("tests/e2e/test_faults.py",): 16,
    ("tests/e2e/test_writers.py",): 13,
    ("tests/test_imports.py",): 12,
}  # fmt: skip


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests for the workers (every worker orders them alike). --dist worksteal
    hands worker i the next len(left) // (workers - i) tests at the start: each worker's
    share starts with the long groups given to it, the least loaded first, then short ones."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    shares: list[list[pytest.Item]] = [[] for _ in range(workers)]
    load = [0] * workers
    for group, seconds in sorted(LONG_GROUPS.items(), key=lambda kv: -kv[1]):
        i = load.index(min(load))
        for name in group:
            shares[i] += modules.pop(name, [])
        load[i] += seconds
    rest = [item for module in modules.values() for item in module]
    left = len(items)
    for i, share in enumerate(shares):
        size = left // (workers - i)
        take = max(0, size - len(share))
        share += rest[:take]
        del rest[:take]
        left -= len(share)
    items[:] = [item for share in shares for item in share] + rest


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": None,  # removed: a real token in the environment must not leak in
    "AWS_PROFILE": None,
}


@pytest.fixture
def mem_url() -> Iterator[str]:
    """A fresh ``memory://`` folder for one test, removed afterwards (the store is global)."""
    root = f"memory://test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto on 127.0.0.1 (a free port), with AWS_* set for the session and restored after."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        with environ(env):
            yield S3Server(env["AWS_ENDPOINT_URL"])
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster of 3 logical CPUs per worker process, for every test that needs
    one (a start is ~10 s and ~6 CPU s); its GCS address, which a driver in a subprocess joins
    through RAY_ADDRESS. Never another cluster that happens to run on this machine."""
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'sage-stream[ray]'")
    from paths import ray_runtime_env

    with environ({"RAY_AUTH_MODE": "disabled"}):  # no token banner; restored after the session
        # Ray starts its workers at nice 15: beside the other pytest worker's computing they
        # got a few per cent of a core, and the Ray tests took 2-3 times as long. Here at 0.
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
                 runtime_env=ray_runtime_env(), _system_config={"worker_niceness": 0})  # fmt: skip
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture
def s3_bucket(s3: S3Server) -> Iterator[str]:
    """``s3://<fresh bucket>`` for one test; the server is reset and s3fs caches cleared after."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    s3.reset()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_deny_get() -> Callable[[str, str], None]:
    """``deny(bucket_url, key)``: a bucket policy that makes one object unreadable (moto
    enforces it: GET answers 403, HEAD and listing still work, as with a missing grant)."""
    import boto3
    import s3fs

    def deny(bucket: str, key: str) -> None:
        name = bucket.removeprefix("s3://")
        statement = {
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{name}/{key}",
        }
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        boto3.client("s3").put_bucket_policy(Bucket=name, Policy=policy)
        s3fs.S3FileSystem.clear_instance_cache()

    return deny


@pytest.fixture
def s3_proxy(s3: S3Server) -> Iterator[FaultProxy]:
    """A proxy to the S3 server whose ``plan`` decides, per request, which fault to inject.

    Faults: "reset" (half the body, then a TCP reset), "reset-early" (reset before any
    answer), "slowdown" (503 SlowDown), "internal" (500 InternalError), "forbidden" (403
    AccessDenied: a bucket these credentials may not read).
    """
    with fault_proxy(s3.endpoint) as proxy:
        yield proxy
