"""manifest.json and shardindex.json: what a finished run says about itself.

Both are computed from the per-shard counts that emit returns, never from the samples, so the
driver's memory grows with the number of shards only. The manifest is deterministic: no
timings, no output location, so a copied output stays valid and a resumed run, a run of the
separate steps, and a one-worker Ray run all write the same bytes.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from ..formats import is_gzip_name
from . import decisions_file, lease
from .folder import SHARDS, OutputFolder

MANIFEST_VERSION = 1
GZIP_UNLISTED = "gzip: wids reads plain tar only"
PACKAGES = ("sage-stream", "torch", "numpy", "pyarrow", "zarr", "fsspec", "webdataset")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def totals(shards: list[dict[str, Any]]) -> dict[str, int]:
    summed = {k: sum(s[k] for s in shards) for k in ("seen", "scored", "errored", "kept")}
    summed["dropped"] = summed["scored"] - summed["kept"]
    return summed


def manifest(
    folder: OutputFolder,
    shards: list[dict[str, Any]],
    selection: dict[str, Any],
    config: dict[str, Any],
    sketch_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    decided = decisions_file.read_summary(folder)  # select's, when it recorded them
    return {
        "format_version": MANIFEST_VERSION,
        "identity": folder.stored_identity(),
        "config": config,
        "selection": selection,
        "versions": versions(),
        "inputs": shards,
        "outputs": outputs(shards),
        "totals": totals(shards),
        "shard_errors": [s for s in shards if s["shard_error"]],
        "sketch": sketch_stats,
        # the mix of decisions (decisions.parquet): only where the selection has them
        **({"decisions": decided["totals"]} if decided else {}),
        # only when there are some (sage_stream.select.warn): a sound run's manifest is unchanged
        **({"warnings": selection["warnings"]} if selection.get("warnings") else {}),
    }


def outputs(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"url": f"{SHARDS}/{s['name']}", "samples": s["kept"]} for s in shards if s["emitted"]]


def shard_index(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """wids index of the output tar shards; URLs are relative to the index's own location.

    Only what wids reads is listed: wids memory-maps plain tar, so a gzipped output shard
    (the output of a .tar.gz/.tgz input keeps its input's name and compression) would fail
    there. Those are named under `not_listed` with the reason (readers ignore extra keys);
    webdataset, Ray Data and `sage_stream.feed` read them, and so does wids once the inputs
    are plain tar (`gunzip -c a.tgz > a.tar`).
    """
    emitted = [s for s in shards if s["format"] == "tar" and s["emitted"]]
    listed = [_entry(s) for s in emitted if not is_gzip_name(s["name"])]
    gzipped = [{**_entry(s), "why": GZIP_UNLISTED} for s in emitted if is_gzip_name(s["name"])]
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1,
             "name": "sage-stream selection", "shardlist": listed}  # fmt: skip
    if gzipped:  # only when there are some: an index of plain tar shards is unchanged
        index["not_listed"] = gzipped
    return index


def _entry(shard: dict[str, Any]) -> dict[str, Any]:
    return {"url": f"{SHARDS}/{shard['name']}", "nsamples": shard["kept"]}


def commit(
    folder: OutputFolder,
    shards: list[dict[str, Any]],
    selection: dict[str, Any],
    config: dict[str, Any],
    sketch_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """manifest.json, shardindex.json, then `_SUCCESS`; the scratch in _work/ goes last."""
    written = manifest(folder, shards, selection, config, sketch_stats)
    folder.remove_temporaries()
    folder.check_outputs(shards)  # nothing listed may be missing under _SUCCESS
    decisions_file.check(folder, shards)  # nor a decision, where the selection records them
    folder.write_json(folder.manifest, written)
    folder.write_json(folder.index, shard_index(shards))
    lease.check(folder)  # a writer whose lease was broken never commits
    folder.mark_success()
    folder.finish()
    return written
