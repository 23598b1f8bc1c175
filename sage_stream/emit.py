"""EMIT: selection → OUT/shards/ (kept samples, byte for byte), manifest.json, shardindex.json,
and `_SUCCESS`, written last as the commit point of the whole run.

Emit never decodes a payload: it streams each input shard again and copies every member of a
kept sample, adding the sample's score (`<key>.sage.json` in tar, `sage_*` columns in Parquet).
Every output object is written under a temporary name and moved into place when complete.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pyarrow as pa

from .config import Config, shard_options
from .errors import ShardError
from .formats import copy_selected
from .progress import Progress
from .resume import (
    read_json,
    recorded_config,
    remove,
    remove_temporaries,
    selection_hash,
    stored_identity,
    work_url,
)
from .sample import ShardRef
from .storage import atomic_write, exists, filesystem, join
from .tables import errored_count, read_part, read_selection

log = logging.getLogger("sage_stream")
MANIFEST_VERSION = 1
ANNOTATION_COLUMNS = ("label", "score", "loss", "grad_norm", "energy")


@dataclass
class EmitResult:
    out: str
    totals: dict[str, int]
    outputs: list[dict[str, Any]]
    seconds: float


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def annotations(part: pa.Table, kept_keys: set[str], scorer: str) -> dict[str, dict[str, Any]]:
    """Per kept key, what the output carries about it: scores of the run and the scorer used."""
    rows = part.select(["__key__", "status", *ANNOTATION_COLUMNS]).to_pylist()
    return {
        row["__key__"]: {
            **{c: _finite_or_none(row[c]) for c in ANNOTATION_COLUMNS},
            "scorer": scorer,
        }
        for row in rows
        if row["__key__"] in kept_keys and row["status"] == "ok"  # a duplicate's error row too
    }


def kept_by_shard(selection: pa.Table) -> dict[str, set[str]]:
    kept: dict[str, set[str]] = {}
    for shard, key in zip(
        selection["__shard__"].to_pylist(), selection["__key__"].to_pylist(), strict=True
    ):
        kept.setdefault(shard, set()).add(key)
    return kept


def _shard_counts(part: pa.Table, kept: int, error: str | None) -> dict[str, Any]:
    errored = errored_count(part)
    counts = {"seen": part.num_rows, "scored": part.num_rows - errored, "errored": errored}
    return {**counts, "kept": kept, "shard_error": error}


def emit_shard(cfg: Config, ref: ShardRef, kept: set[str], scorer: str) -> dict[str, Any]:
    """Write OUT/shards/<name> with the kept samples of `ref`; returns its counts.

    A shard that cannot be read again is fine only if pass 2 already recorded it as broken and
    nothing of it is kept: then there is no output shard for it, and the manifest says so.
    """
    part, error = read_part(cfg.out, ref.name, storage_options=cfg.storage_options)
    keep = annotations(part, kept, scorer)
    url = join(cfg.out, "shards", ref.name)
    try:
        with atomic_write(url, cfg.storage_options) as f:
            written = copy_selected(
                ref, f, keep, cfg.storage_options, **shard_options(cfg, ref.format)
            )
    except ShardError:
        if error is None or keep:
            raise
        log.warning("%s: unreadable and nothing kept: no output shard", ref.name)
        return {"name": ref.name, "url": ref.url, "format": ref.format, "emitted": False,
                **_shard_counts(part, 0, error)}  # fmt: skip
    if written != len(keep):  # the shard changed since it was scored: its scores are stale
        raise ShardError(
            ref.url,
            f"{len(keep)} kept samples were scored but {written} found when copying; "
            "was the shard rewritten? score it again (--overwrite)",
        )
    return {"name": ref.name, "url": ref.url, "format": ref.format, "emitted": True,
            **_shard_counts(part, written, error)}  # fmt: skip


def emit_marked(
    cfg: Config, ref: ShardRef, kept: set[str], scorer: str, marker: str
) -> dict[str, Any]:
    """Emit one shard, then its marker: a shard with a marker is never emitted again."""
    counts = emit_shard(cfg, ref, kept, scorer)
    write_json(marker, counts, cfg.storage_options)
    return counts


def versions() -> dict[str, str]:
    names = ("sage-stream", "torch", "numpy", "pyarrow", "zarr", "fsspec", "webdataset")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _totals(shards: list[dict[str, Any]]) -> dict[str, int]:
    totals = {k: sum(s[k] for s in shards) for k in ("seen", "scored", "errored", "kept")}
    totals["dropped"] = totals["scored"] - totals["kept"]
    return totals


def write_json(url: str, value: Any, storage_options: dict | None = None) -> None:
    with atomic_write(url, storage_options) as f:
        f.write(json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def write_index(cfg: Config, shards: list[dict[str, Any]]) -> None:
    """wids index of the output tar shards; URLs are relative to the index's own location."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": "sage-stream selection",
        "shardlist": [
            {"url": f"shards/{s['name']}", "nsamples": s["kept"]}
            for s in shards
            if s["format"] == "tar" and s["emitted"]
        ],
    }
    write_json(join(cfg.out, "shardindex.json"), index, cfg.storage_options)


def emit_shards(cfg: Config, refs: list[ShardRef]) -> tuple[list[dict[str, Any]], dict, float]:
    """Emit every shard not yet emitted for this selection; returns per-shard counts."""
    selection, params = read_selection(cfg.out, cfg.storage_options)
    kept = kept_by_shard(selection)
    scorer = params.get("scorer", cfg.scorer)
    markers = work_url(cfg.out, f"emitted-{selection_hash(cfg.out, cfg.storage_options)}")
    progress = Progress("emit", len(refs), cfg.progress)
    shards = []
    for ref in refs:
        marker = join(markers, ref.name)
        counts = read_json(marker, cfg.storage_options)
        if counts is None:
            counts = emit_marked(cfg, ref, kept.get(ref.name, set()), scorer, marker)
        shards.append(counts)
        progress.advance(counts["kept"])
        progress.shard_done(ref.name)
    return shards, params, progress.close()


def run_emit(cfg: Config, refs: list[ShardRef], sketch_stats: dict | None) -> EmitResult:
    """Emit every shard, then the manifest, the index and `_SUCCESS`, in that order."""
    shards, params, seconds = emit_shards(cfg, refs)
    return finish_emit(cfg, shards, params, sketch_stats, seconds)


def finish_emit(
    cfg: Config,
    shards: list[dict[str, Any]],
    params: dict,
    sketch_stats: dict | None,
    seconds: float,
) -> EmitResult:
    """manifest.json, shardindex.json, then `_SUCCESS`; the scratch in OUT/_work/ goes last."""
    totals = _totals(shards)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "identity": stored_identity(cfg.out, cfg.storage_options),
        "config": recorded_config(cfg),
        "selection": params,
        "versions": versions(),
        "inputs": shards,
        "outputs": [
            {"url": f"shards/{s['name']}", "samples": s["kept"]} for s in shards if s["emitted"]
        ],
        "totals": totals,
        "shard_errors": [s for s in shards if s["shard_error"]],
        "sketch": sketch_stats,
    }
    remove_temporaries(cfg.out, cfg.storage_options)
    write_json(join(cfg.out, "manifest.json"), manifest, cfg.storage_options)
    write_index(cfg, shards)
    mark_success(cfg.out, cfg.storage_options)
    remove(work_url(cfg.out), cfg.storage_options)
    return EmitResult(cfg.out, totals, manifest["outputs"], seconds)


def success_url(out: str) -> str:
    return join(out, "_SUCCESS")


def mark_success(out: str, storage_options: dict | None = None) -> None:
    with atomic_write(success_url(out), storage_options) as f:
        f.write(b"")


def clear_success(out: str, storage_options: dict | None = None) -> None:
    """Called before any step changes OUT: a run in progress is never marked complete."""
    if exists(success_url(out), storage_options):
        fs, path = filesystem(success_url(out), storage_options)
        fs.rm(path)
