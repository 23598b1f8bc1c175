"""The loader: shards read and decoded in worker processes, handed over in shard order.

    read (formats) → decode → batch          in `--loader-workers N` processes
    → the shard loop (loop.py)              in this process: model, gradient features, sketch

Why processes and not threads: decoding (PIL, numpy, zlib) holds the GIL for most of its
work, and a pass is a single Python thread doing read → decode → model in turn; with the
decode in other processes the model's batch n overlaps the decode of batches n+1, n+2, ...

Order is fixed by (shard, position), never by timing: shard j goes to worker j mod N, each
worker reads its shards in input order into its own bounded queue, and the consumer takes
shard j's items from worker j mod N's queue until the shard's end, then moves to shard j+1.
Whatever the number of workers (0 = in this process) the consumer sees the same items in the
same order, so every output is byte-identical for every N. Memory is bounded: each queue
holds at most `prefetch` items (batches), so O(N × prefetch × batch) in flight. A batch's
tensors travel as shared memory (torch.multiprocessing), not through the pipe: a decoded
batch is megabytes, and copying it through a pipe cost the consumer more than it gained.

A worker that dies (OOM-killed, a crash in native code) is noticed while the consumer waits
and raised as a `LoaderError` naming the shard; it never hangs the pass. Processes are
started with "spawn": s3fs/aiohttp clients and CUDA do not survive a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as tmp

from ..decode.batches import Batch, Decoder, Skipped, decoded_batches
from ..errors import InputError, LoaderError, SageError, ShardError
from ..formats import read_shard
from ..sample import ShardRef

log = logging.getLogger("sage_stream")
PREFETCH = 4  # batches queued per worker: enough to cover a slow batch, small in memory
POLL_S = 0.5  # how often a waiting consumer checks that the worker is still alive
_END = "end"


@dataclass(frozen=True)
class ReadSpec:
    """Everything a worker needs to turn a shard into batches (small and picklable)."""

    decoder: Decoder
    storage_options: dict[str, Any]
    reader_options: dict[str, dict[str, Any]]  # per format: read_shard's keyword options
    batch_size: int
    num_classes: int

    def batches(self, ref: ShardRef) -> Iterator[Batch | Skipped]:
        samples = read_shard(ref, self.storage_options, **self.reader_options[ref.format])
        return decoded_batches(
            samples, self.decoder, batch_size=self.batch_size, num_classes=self.num_classes
        )


def default_workers(device: torch.device) -> int:
    """`--loader-workers` when not given: decode processes beside the one running the model.

    On CUDA the GPU waits for decode unless spare cores decode (up to 8, one core left for the
    model's process). On a CPU node the model's own threads need the same cores, and on the
    2-core machine of docs/benchmarks.md workers measured no faster than decoding in-process
    (benchmarks/loader.py), so there the default is 0; ask for workers with more cores.
    """
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) - 1))


def loader_workers_for(asked: int | None, device: torch.device, urls: Sequence[str]) -> int:
    """`--loader-workers` as asked, or the default; memory:// lives in one process only, so
    there the default is 0 and asking for workers is an error."""
    private = [u for u in urls if u.startswith("memory:")]
    if asked is None:
        return 0 if private else default_workers(device)
    if asked > 0 and private:
        raise InputError(
            f"{private[0]}: memory:// is private to this process, loader workers cannot see "
            "it; pass --loader-workers 0"
        )
    return asked


def decoded_shards(
    spec: ReadSpec, refs: Sequence[ShardRef], workers: int
) -> Generator[tuple[ShardRef, Iterator[Batch | Skipped]], None, None]:
    """(shard, its batches and skips in order) for each shard of `refs`, in input order.

    Each inner iterator must be consumed (or abandoned by closing the outer one) before the
    next shard is taken; a broken stream raises its ShardError from the inner iterator after
    the complete batches before the break, exactly as in-process reading does.
    """
    if workers <= 0 or not refs:
        for ref in refs:
            yield ref, spec.batches(ref)
        return
    with _Pool(spec, list(refs), min(workers, len(refs))) as pool:
        for j, ref in enumerate(refs):
            yield ref, pool.shard(j, ref)


class _Pool:
    """N spawned workers, each with its own bounded queue; see the module docstring."""

    def __init__(self, spec: ReadSpec, refs: list[ShardRef], workers: int):
        _check_picklable(spec)
        ctx = tmp.get_context("spawn")
        self.stop = ctx.Event()
        self.queues = [ctx.Queue(maxsize=PREFETCH) for _ in range(workers)]
        self.procs = [
            ctx.Process(
                target=_work,
                args=(spec, refs[w::workers], self.queues[w], self.stop),
                name=f"sage-loader-{w}",
                daemon=True,
            )
            for w in range(workers)
        ]
        for proc in self.procs:
            proc.start()

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shard(self, j: int, ref: ShardRef) -> Iterator[Batch | Skipped]:
        w = j % len(self.procs)
        while True:
            kind, value = self._get(w, ref)
            if kind == _END:
                return
            if kind == "item":
                yield value
            else:  # "raise": the shard's ShardError, or the worker's own failure
                raise value

    def _get(self, w: int, ref: ShardRef) -> tuple[str, Any]:
        proc = self.procs[w]
        while True:
            try:
                return self.queues[w].get(timeout=POLL_S)
            except queue.Empty:
                if not proc.is_alive():
                    raise self._died(w, ref) from None
            except Exception as exc:  # a batch whose shared memory went with its worker
                proc.join(timeout=POLL_S)
                if proc.is_alive():
                    raise
                raise self._died(w, ref) from exc

    def _died(self, w: int, ref: ShardRef) -> LoaderError:
        proc = self.procs[w]
        return LoaderError(
            f"loader worker {w} (pid {proc.pid}) died with exit code {proc.exitcode} (the pass "
            f"was at {ref.url}; the worker reads ahead); out of memory? Run with "
            "--loader-workers 0 to decode in this process and see the error"
        )

    def close(self) -> None:
        self.stop.set()
        for q in self.queues:  # unblock workers waiting on a full queue
            with contextlib.suppress(Exception):
                while True:
                    q.get_nowait()
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        for q in self.queues:
            q.close()
            q.cancel_join_thread()


def _check_picklable(spec: ReadSpec) -> None:
    try:
        pickle.dumps(spec)
    except Exception as exc:  # noqa: BLE001 - pickle raises many types for many reasons
        raise InputError(
            f"--loader-workers needs a decoder that can be sent to a worker process, and "
            f"this one cannot be pickled ({type(exc).__name__}: {exc}); make --preprocess an "
            "importable module:function, or pass --loader-workers 0"
        ) from None


def _put(q: Any, stop: Any, message: tuple[str, Any]) -> bool:
    """Put, waiting while the queue is full; False once the consumer has stopped."""
    while not stop.is_set():
        try:
            q.put(message, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _work(spec: ReadSpec, refs: list[ShardRef], q: Any, stop: Any) -> None:
    """A worker: read, decode and batch its shards in order into its queue."""
    torch.set_num_threads(1)  # decoding only: the model's process has the cores' threads
    try:
        _read_all(spec, refs, q, stop)
    finally:
        # The batches' tensors reach the consumer as shared memory that this process hands
        # out on request: stay until the consumer is done (or gone).
        stop.wait()


def _read_all(spec: ReadSpec, refs: list[ShardRef], q: Any, stop: Any) -> None:
    for ref in refs:
        try:
            for item in spec.batches(ref):
                if not _put(q, stop, ("item", item)):
                    return
        except SageError as exc:
            _put(q, stop, ("raise", exc))  # the consumer stops reading this shard here
            if not isinstance(exc, ShardError):
                return  # not about this shard: the pass stops at it
            continue
        except BaseException as exc:  # noqa: BLE001 - sent to the consumer, which raises it
            _put(q, stop, ("raise", _portable(exc, ref)))
            return
        if not _put(q, stop, (_END, None)):
            return


def _portable(exc: BaseException, ref: ShardRef) -> BaseException:
    """The worker's error as something the consumer can unpickle and raise."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return LoaderError(f"loader worker failed on {ref.url}: {type(exc).__name__}: {exc}")
