"""--executor ray on a local 3-CPU Ray cluster: the local answer, the FD bound, and faults.

One cluster for the whole session (conftest's `ray_cluster`: start-up is seconds and ~1.5 GB).
The runs go through `sage_stream.run` (or its separate steps) with `executor="ray"` (`ray_run`
below); the pipeline test goes through `pipelines/ray_job.py`, the CLI and `api`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from paths import HELPERS
from runs import assert_same_outputs, kept_keys, output_files
from shardmaker import make_tar_shard, npy_bytes
from tiny import blobs, mlp, train_checkpoint, write_tar_set

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'sage-stream[ray]'")

import sage_stream  # noqa: E402
from sage_stream.config import make_config  # noqa: E402
from sage_stream.errors import InputError, SampleError  # noqa: E402
from sage_stream.executors import open_executor  # noqa: E402
from sage_stream.executors.ray_worker import ShardWorker  # noqa: E402
from sage_stream.outputs.sketch_store import SketchStore  # noqa: E402
from sage_stream.passes import sketch as pass1  # noqa: E402
from sage_stream.passes.loop import build_context  # noqa: E402

pytestmark = pytest.mark.ray
TESTS = Path(__file__).parent
PYTHONPATH = [str(TESTS), str(HELPERS)]  # this module (CountingDecoder) and `tiny:mlp`
N, SHARDS = 180, 4  # shards of 45: two workers get two shards each
OPTIONS = dict(
    model="tiny:mlp", ell=16, batch_size=32, device="cpu", keep=0.5, progress=False,
    checkpoint_every=0,
)  # fmt: skip


class CountingDecoder:
    """--preprocess for fault tests: the built-in decoder, counting its calls in a file.

    At the calls numbered in `kill_at` it SIGKILLs its own process (a worker dying mid-shard);
    at call `pause_at` (the first to reach it, of all workers) it touches `<counter>.paused`
    and sleeps, for the test to kill the driver. Every run of this module decodes through it,
    so that their configurations (and manifests) are the same.
    """

    def __init__(
        self, counter: str, kill_at: tuple[int, ...] = (), pause_at: int = 0,
        slow_worker: bool = False,
    ):  # fmt: skip
        self.counter, self.kill_at, self.pause_at = counter, kill_at, pause_at
        self.slow_worker = slow_worker  # the first process to decode sleeps on every sample

    def __call__(self, sample):  # noqa: ANN001, ANN204
        from sage_stream.decode.decoder import make_decoder

        with open(self.counter, "ab") as f:  # one byte per call: appends do not race
            f.write(b".")
        calls = os.path.getsize(self.counter)
        if calls in self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.slow_worker:
            with contextlib.suppress(FileExistsError):
                fd = os.open(f"{self.counter}.slow", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
            if Path(f"{self.counter}.slow").read_text() == str(os.getpid()):
                time.sleep(0.01)
        if self.pause_at and calls >= self.pause_at:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(f"{self.counter}.paused", os.O_CREAT | os.O_EXCL))
                time.sleep(300)
        return make_decoder()(sample)


# Ray workers rebuild CountingDecoder from its pickle, not by importing this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    x, _, noisy = blobs(N)
    return {
        "x": x,
        "y": noisy,
        "urls": write_tar_set(root / "tar", x, noisy, shards=SHARDS),
        "ckpt": train_checkpoint(root / "proxy.pt", x, noisy),
    }


def ray_run(
    urls: list[str], out: Path, workers: int, emit_on_tasks: bool = False, **options
) -> sage_stream.EmitResult:
    """`sage_stream.run` on Ray with `workers` actors for both passes and emit; with
    `emit_on_tasks`, the separate steps instead, whose emit runs as one Ray task per shard (as
    `sage-stream emit` does)."""
    options = {**OPTIONS, **options, "executor": "ray", "workers": workers}
    if not emit_on_tasks:
        return sage_stream.run(urls, out=str(out), **options).emit
    keep = options.pop("keep")
    sage_stream.sketch(urls, out=str(out), **options)
    sage_stream.score(urls, out=str(out), **options)
    sage_stream.select(urls, out=str(out), keep=keep)
    return sage_stream.emit(urls, out=str(out), executor="ray", progress=False)


@pytest.fixture(scope="module")
def local_out(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    decoder = CountingDecoder(str(root / "calls"))
    options = dict(checkpoint=data["ckpt"], preprocess=decoder, **OPTIONS)
    sage_stream.run(data["urls"], out=str(root / "out"), **options)
    return root / "out"


@pytest.fixture(scope="module")
def two_workers_out(ray_cluster, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray2")
    decoder = CountingDecoder(str(root / "calls"))
    ray_run(data["urls"], root / "out", workers=2, checkpoint=data["ckpt"], preprocess=decoder)
    return root / "out"


@pytest.mark.parametrize("units", [1, 3])
def test_units_in_process_are_the_local_sketch(data, tmp_path, monkeypatch, units):
    """The worker's code path without Ray, with groups of ~8 samples (some 20 groups on two
    levels, so units hand over items): each unit sketched and checkpointed, then the items
    replayed: the local run's sketch, byte for byte; the checkpoints are dropped at the end."""
    monkeypatch.setattr(pass1, "group_rows", lambda ell: 8)
    options = dict(inputs=data["urls"], checkpoint=data["ckpt"], **OPTIONS)
    local = tmp_path / "local"
    sketch_options = {k: v for k, v in OPTIONS.items() if k != "keep"}
    sage_stream.sketch(data["urls"], out=str(local), checkpoint=data["ckpt"], **sketch_options)
    cfg = make_config(out=str(tmp_path / "units"), **options)
    worker = ShardWorker(cfg)
    refs = build_context(cfg).refs
    summaries = [worker.sketch_unit(refs, i, units) for i in range(units)]
    if units > 1:
        assert any(s["items"] for s in summaries[1:])  # some unit handed over states
    assert list((tmp_path / "units" / "_work").glob(f"pass1-unit-*-of-0000{units}*")) != []
    worker.finish(summaries, seconds=0.0)
    mine = output_files(tmp_path / "units" / "sketch.zarr")
    assert mine == output_files(local / "sketch.zarr")
    assert list((tmp_path / "units" / "_work").glob("pass1-unit-*")) == []


def test_one_worker_equals_local_byte_for_byte_though_killed_twice(
    ray_cluster, data, local_out, tmp_path
):
    """One worker, SIGKILLed in pass 1 (shard 3 of 4) and in pass 2 (shard 2, read again:
    --feature-cache 0); Ray restarts it and retries the call in flight; the outputs are the
    local run's (which kept features for pass 2), byte for byte."""
    counter = str(tmp_path / "calls")
    decoder = CountingDecoder(counter, kill_at=(100, 250))
    out = tmp_path / "out"
    ray_run(data["urls"], out, workers=1, checkpoint=data["ckpt"], preprocess=decoder,
            feature_cache=0)  # fmt: skip
    # Pass 1: 100 calls, killed in shard 3; resumed after shards 1-2 (checkpointed): 90 more.
    # Pass 2: shard 1, then killed at the 15th call of shard 2; shard 2 again and shards 3-4.
    assert os.path.getsize(counter) == (100 + 90) + (45 + 15) + (45 + 90)
    assert_same_outputs(local_out, out)


def test_stage_errors_come_back_typed(ray_cluster, data, tmp_path):
    """--on-error fail on a worker raises the local run's SampleError, with shard and key."""
    x = data["x"][0]
    samples = {"a": {"npy": npy_bytes(x), "cls": b"1"}, "b": {"npy": b"no npy", "cls": b"2"}}
    cfg = make_config(
        inputs=[make_tar_shard(tmp_path / "bad.tar", samples)], out=str(tmp_path / "out"),
        checkpoint=data["ckpt"], on_error="fail", executor="ray", **OPTIONS,
    )  # fmt: skip
    with pytest.raises(SampleError) as raised, open_executor(cfg.replace(workers=1)) as running:
        running.sketch(build_context(cfg))
    assert (raised.value.shard, raised.value.key) == ("bad.tar", "b")
    # A worker whose model does not load raises on every call instead of dying (in process).
    worker = ShardWorker(cfg.replace(model="nosuch:factory"))
    with pytest.raises(InputError, match="nosuch"):
        worker.stored_sketch()


def head_gradients(data) -> torch.Tensor:
    """g_i of the head (weight, bias) by autograd, one sample at a time: (N, D) float64."""
    model = mlp()
    model.load_state_dict(torch.load(data["ckpt"], weights_only=True))
    head, rows = model[2], []
    for i in range(N):
        x, y = torch.from_numpy(data["x"][i : i + 1]), torch.tensor([int(data["y"][i])])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
        rows.append(torch.cat([gw.flatten(), gb]).double())
    return torch.stack(rows)


def test_two_workers_keep_the_fd_bound_for_all_rows(data, two_workers_out, local_out):
    a = head_gradients(data)  # (N, D), D = 3 * 17 = 51 > ℓ = 16: the sketch is lossy
    sk = SketchStore(str(two_workers_out / "sketch.zarr")).read()
    b = sk.sigma.double()[:, None] * sk.basis.double()  # (ℓ, D)
    err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, ord=2).item()
    frob = a.square().sum().item()
    delta = sk.stats["delta"]
    assert sk.stats["n"] == N and sk.stats["frobenius_sq"] == pytest.approx(frob, rel=1e-5)
    assert 0 < err <= delta * (1 + 1e-4) + 1e-6 * frob
    assert delta <= frob / 16


def test_two_workers_write_the_local_bytes(two_workers_out, local_out):
    assert_same_outputs(local_out, two_workers_out)
    manifest = json.loads((two_workers_out / "manifest.json").read_text())
    assert manifest["totals"]["seen"] == N and (two_workers_out / "_SUCCESS").exists()


UNEVEN = (7, 61, 23, 2, 40, 27)  # samples per shard


def test_two_three_workers_and_a_slow_one_write_the_local_bytes(ray_cluster, data, tmp_path):
    """Uneven shards; on Ray the first worker to decode is slowed down, so groups go to the
    workers in an order that differs from run to run: every output is the local run's. (One
    worker has one unit and nothing to reorder: the killed-twice test above runs one.)"""
    urls, start = [], 0
    for s, n in enumerate(UNEVEN):
        idx = range(start, start + n)
        samples = {f"{i:06d}": {"npy": npy_bytes(data["x"][i]), "cls": str(int(data["y"][i])).encode()}
                   for i in idx}  # fmt: skip
        urls.append(make_tar_shard(tmp_path / "in" / f"part-{s:03d}.tar", samples))
        start += n
    outs = {}
    for workers in (0, 2, 3):
        decoder = CountingDecoder(str(tmp_path / f"calls-{workers}"), slow_worker=workers > 0)
        options = dict(checkpoint=data["ckpt"], preprocess=decoder)
        out = tmp_path / f"out-{workers}"
        if workers == 0:  # one torch thread, as in a one-CPU Ray actor: a batch's float
            threads = torch.get_num_threads()  # sums may differ in the last bit by thread count
            torch.set_num_threads(1)
            try:
                sage_stream.run(urls, out=str(out), **OPTIONS, **options)
            finally:
                torch.set_num_threads(threads)
        else:
            ray_run(urls, out, workers=workers, **options)
        outs[workers] = out
    for workers in (2, 3):
        assert_same_outputs(outs[0], outs[workers])


def test_centroid_consensus_scores_as_the_local_run(ray_cluster, data, two_workers_out, tmp_path):
    """Workers store z per shard, the driver scores against the centroids: same bytes."""
    results = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        shutil.copytree(two_workers_out / "sketch.zarr", out / "sketch.zarr")
        cfg = make_config(
            inputs=data["urls"], out=str(out), checkpoint=data["ckpt"], consensus="centroid",
            executor=executor, **OPTIONS,
        )  # fmt: skip
        ctx = build_context(cfg)
        sketch = SketchStore(str(out / "sketch.zarr")).read(expected=ctx.identity())
        with open_executor(cfg.replace(workers=2)) as running:
            results[executor] = running.score(ctx, sketch)
    expected, got = results["local"], results["ray"]
    assert got.seen == N and (got.scored, got.errored) == (expected.scored, expected.errored)
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")
    assert list((tmp_path / "ray" / "sketch.zarr" / "projections").iterdir()) != []


DRIVER = """
import sys
sys.path[:0] = {tests!r}
import paths, ray, test_ray
ray.init(address={address!r}, runtime_env=paths.ray_runtime_env(), log_to_driver=False)
decoder = test_ray.CountingDecoder({counter!r}, pause_at={pause_at})
test_ray.ray_run({urls!r}, test_ray.Path({out!r}), 2, checkpoint={ckpt!r}, preprocess=decoder)
"""


@pytest.mark.slow
def test_driver_killed_and_restarted_resumes_from_checkpoints(
    ray_cluster, data, two_workers_out, tmp_path
):
    """A driver in its own process, killed in pass 1 while both workers sketch; this process
    then runs the same job again: it resumes from the block checkpoints in OUT/_work/. (Its
    emit runs as one Ray task per shard, where the other runs use the worker actors.)"""
    out, counter = tmp_path / "out", str(tmp_path / "calls")
    script = DRIVER.format(
        tests=PYTHONPATH, address=ray_cluster, counter=counter, pause_at=120, urls=data["urls"],
        out=str(out), ckpt=data["ckpt"],
    )  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=TESTS)
    deadline = time.monotonic() + 120  # a loaded machine: start-up alone can take 20 s
    while not Path(f"{counter}.paused").exists() and driver.poll() is None:
        assert time.monotonic() < deadline, "the driver never reached decode call 120"
        time.sleep(0.2)
    driver.kill()  # Ray stops the actors of a dead driver
    assert driver.wait() == -signal.SIGKILL
    assert list((out / "_work").glob("pass1-unit-*")) != []
    Path(counter).write_bytes(b"")
    decoder = CountingDecoder(counter)
    ray_run(data["urls"], out, 2, emit_on_tasks=True, checkpoint=data["ckpt"], preprocess=decoder)
    # 120 calls before the kill put at least one unit past its first shard (45 samples),
    # which was checkpointed: the rerun decodes less than the uninterrupted run did (whose
    # pass 1 also reads where units overlap: the second unit scans its shards for the first
    # group that starts there, and the first reads on to the end of its last group).
    full = os.path.getsize(two_workers_out.parent / "calls")
    assert os.path.getsize(counter) <= full - 45
    assert output_files(out) == output_files(two_workers_out)


@pytest.fixture
def s3_options():
    """A local S3 server of this test's own; its options reach every worker in the config."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    server.stop()


def spy(monkeypatch, owner, names: tuple[str, ...]) -> list[str]:
    calls: list[str] = []
    for name in names:
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):  # noqa: ANN001, ANN202
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    return calls


def job_config(data, s3_options: dict) -> str:
    """pipelines/ray-s3-gpu.toml, pointed at the tiny shards in S3 and the CPU."""
    config = (HELPERS.parents[1] / "pipelines" / "ray-s3-gpu.toml").read_text()
    assert 'executor = "ray"' in config
    changes = {
        "inputs": [f"s3://bucket/train/{Path(u).name}" for u in data["urls"]],
        "out": "s3://bucket/train-sage", "model": "tiny:mlp", "checkpoint": data["ckpt"],
        "input-key": "npy", "ell": 16, "batch-size": 32, "device": "cpu", "keep": 0.5,
    }  # fmt: skip
    for name, value in changes.items():
        lines = [line for line in config.splitlines() if line.startswith(f"{name} ")]
        assert len(lines) == 1, name
        config = config.replace(lines[0], f"{name} = {json.dumps(value)}")
    options = "".join(f"{k} = {json.dumps(v)}\n" for k, v in s3_options.items())
    return config.replace("[storage_options]", "checkpoint-every = 0\n[storage_options]") + options


def test_pipeline_job_runs_the_s3_config_on_ray(
    ray_cluster, data, s3_options, two_workers_out, tmp_path, monkeypatch
):
    """pipelines/ray_job.py + ray-s3-gpu.toml: S3 in and out, through the CLI and api."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir("bucket")
    fs.put([str(u) for u in data["urls"]], "bucket/train/")
    (tmp_path / "job.toml").write_text(job_config(data, s3_options))
    from sage_stream.executors.ray import RayExecutor

    calls = spy(monkeypatch, RayExecutor, ("sketch_shards", "score_shards", "emit_jobs"))
    sys.path.insert(0, str(HELPERS.parents[1] / "pipelines"))
    try:
        import ray_job
    finally:
        sys.path.remove(str(HELPERS.parents[1] / "pipelines"))
    assert ray_job.main(["--config", str(tmp_path / "job.toml"), "--no-progress"]) == 0
    assert calls == ["sketch_shards", "score_shards", "emit_jobs"]  # api went through Ray
    assert fs.exists("bucket/train-sage/_SUCCESS")
    with fs.open("bucket/train-sage/selection.parquet") as f:
        kept = set(pq.read_table(f, columns=["__key__"])["__key__"].to_pylist())
    assert kept == kept_keys(two_workers_out)  # the default on CPU: two workers
