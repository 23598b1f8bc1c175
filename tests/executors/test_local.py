"""The Executor interface: the passes' bookkeeping is theirs; an executor only maps shards.

Ray's executor is tested on a cluster in test_ray.py; here a recording subclass of the local
one shows what every executor is asked for: only the shards not done yet, in shard order.
"""

from __future__ import annotations

import pytest
from tiny import blobs, train_checkpoint, write_tar_set

from sage_stream.config import make_config
from sage_stream.executors import Executor, open_executor
from sage_stream.executors.local import LocalExecutor
from sage_stream.passes.loop import build_context

OPTIONS = dict(model="tiny:mlp", ell=16, batch_size=32, device="cpu", progress=False)


class Recording(LocalExecutor):
    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []

    def score_shards(self, ctx, refs, sketch, progress):
        self.asked.append(("score", [r.name for r in refs]))
        return super().score_shards(ctx, refs, sketch, progress)

    def emit_jobs(self, cfg, jobs):
        self.asked.append(("emit", [j.ref.name for j in jobs]))
        return super().emit_jobs(cfg, jobs)


@pytest.fixture
def job(tmp_path):
    x, _, noisy = blobs(90)
    urls = write_tar_set(tmp_path / "in", x, noisy, shards=3)
    ckpt = train_checkpoint(tmp_path / "proxy.pt", x, noisy)
    cfg = make_config(inputs=urls, out=str(tmp_path / "out"), checkpoint=ckpt, **OPTIONS)
    return cfg


def test_open_executor_gives_the_local_one_by_default(job):
    with open_executor(job) as executor:
        assert isinstance(executor, LocalExecutor) and isinstance(executor, Executor)


def test_an_executor_is_asked_only_for_shards_not_done(job):
    ctx = build_context(job)
    first = Recording()
    sketch = first.sketch(ctx)
    assert sketch.samples == 90
    stored = ctx.out.sketch_store().read(expected=ctx.identity())
    first.score(ctx, stored)
    ctx.out.remove(ctx.out.part("part-001.tar"))  # as if killed before this part was written
    again = Recording()
    assert again.sketch(ctx).seconds == 0.0  # the stored sketch is reused, nothing sketched
    result = again.score(ctx, stored)
    assert again.asked == [("score", ["part-001.tar"])]
    assert (result.seen, result.scored + result.errored) == (90, 90)


def test_emit_is_asked_only_for_shards_without_a_marker(job):
    import sage_stream

    sage_stream.run(config=job.replace(keep=0.5))
    from sage_stream.outputs.lease import hold

    ctx = build_context(job)
    first = Recording()
    with hold(ctx.out):  # what the api's steps do around an executor
        first.emit(job, ctx.refs, None)  # every marker went with _work/ after _SUCCESS
    assert first.asked == [("emit", ["part-000.tar", "part-001.tar", "part-002.tar"])]
    digest = ctx.out.selection_hash()
    ctx.out.write_json(ctx.out.emitted_marker(digest, "part-000.tar"),
                       ctx.out.read_json(ctx.out.manifest)["inputs"][0])  # fmt: skip
    again = Recording()
    with hold(ctx.out):
        result = again.emit(job, ctx.refs, None)
    assert again.asked == [("emit", ["part-001.tar", "part-002.tar"])]
    assert result.totals["seen"] == 90 and result.totals["kept"] == 45
