"""Resume and run identity: what lets a killed job start again and finish with the same bytes.

    OUT/_work/run.json      what OUT is being built from (inputs, data options, model
                            fingerprint, gradient config); a rerun with anything else is
                            refused unless --overwrite. Also kept in manifest.json.
    OUT/_work/pass1.pt      pass 1 checkpoint: FD state + class sums + shards done, O(ℓ·D + C·D)
    OUT/_work/emitted-<selection hash>/<shard>   one marker per shard emitted for a selection

Pass 2 needs no checkpoint of its own: a scores part is written atomically, so a part that
exists is finished. `_work/` is removed once `_SUCCESS` is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import torch

from .config import Config
from .errors import OutputExistsError
from .sample import ShardRef
from .storage import atomic_write, exists, filesystem, join, open_input

log = logging.getLogger("sage_stream")
WORK = "_work"
# Everything a run writes into OUT; --overwrite removes exactly these, nothing else.
OUTPUT_ENTRIES = (
    "sketch.zarr", "scores", "selection.parquet", "shards", "manifest.json",
    "shardindex.json", "_SUCCESS", "report", WORK,
)  # fmt: skip


def work_url(out: str, *parts: str) -> str:
    return join(out, WORK, *parts)


def run_identity(cfg: Config, refs: list[ShardRef], model_fingerprint: str) -> dict[str, Any]:
    """What the contents of OUT depend on, besides the selection (which may be redone)."""
    described = cfg.describe()
    return {
        "inputs": [ref.url for ref in refs],
        "model": model_fingerprint,
        **{k: described[k] for k in ("input_key", "label_key", "key_column", "preprocess")},
        "max_member_bytes": cfg.max_member_bytes,
        **cfg.sketch_identity(),
        "batch_size": cfg.batch_size,
        "consensus": cfg.consensus,
        "sketched": cfg.scorer == "sage",
    }


def read_json(url: str, storage_options: dict) -> Any:
    if not exists(url, storage_options):
        return None
    with open_input(url, storage_options) as f:
        return json.load(f)


def stored_identity(out: str, storage_options: dict) -> dict[str, Any] | None:
    found = read_json(work_url(out, "run.json"), storage_options)
    if found is None:
        manifest = read_json(join(out, "manifest.json"), storage_options) or {}
        found = manifest.get("identity")
    return found


def wipe_output(out: str, storage_options: dict) -> None:
    for entry in OUTPUT_ENTRIES:
        remove(join(out, entry), storage_options)


def claim_output(cfg: Config, identity: dict[str, Any]) -> None:
    """Refuse to mix runs in one OUT: a different identity needs --overwrite (which wipes)."""
    stored = stored_identity(cfg.out, cfg.storage_options)
    if stored is not None and stored != identity:
        changed = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
        if not cfg.overwrite:
            raise OutputExistsError(
                f"{cfg.out} holds a run with another configuration (differs in: "
                f"{', '.join(changed)}); use another --out, or --overwrite to replace it"
            )
        log.warning("--overwrite: removing the earlier run in %s (%s)", cfg.out, ", ".join(changed))
        wipe_output(cfg.out, cfg.storage_options)
    with atomic_write(work_url(cfg.out, "run.json"), cfg.storage_options) as f:
        f.write(json.dumps(identity, indent=2, sort_keys=True).encode())
    with atomic_write(work_url(cfg.out, "config.json"), cfg.storage_options) as f:
        f.write(json.dumps(run_config(cfg), indent=2, sort_keys=True).encode())


SELECTION_FIELDS = ("keep", "balance", "min_score")  # the manifest has them under "selection"


def run_config(cfg: Config) -> dict[str, Any]:
    """The configuration the manifest records: that of the command which made the scores."""
    return {k: v for k, v in cfg.describe().items() if k not in SELECTION_FIELDS}


def recorded_config(cfg: Config) -> dict[str, Any]:
    """What claimed OUT recorded; else the earlier manifest's; else this command's own."""
    found = read_json(work_url(cfg.out, "config.json"), cfg.storage_options)
    if found is None:
        found = (read_json(join(cfg.out, "manifest.json"), cfg.storage_options) or {}).get("config")
    return found if found is not None else run_config(cfg)


def save_state(url: str, state: dict[str, Any], storage_options: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_write(url, storage_options) as f:
        f.write(buf.getvalue())


def load_state(url: str, storage_options: dict) -> dict[str, Any] | None:
    """A checkpoint written by `save_state`, loaded with weights_only=True; None if absent."""
    if not exists(url, storage_options):
        return None
    with open_input(url, storage_options) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def remove(url: str, storage_options: dict) -> None:
    if exists(url, storage_options):
        fs, path = filesystem(url, storage_options)
        fs.rm(path, recursive=True)


def remove_temporaries(out: str, storage_options: dict) -> None:
    """Delete what killed writers left behind (`<name>.tmp-<hex>`, see storage.atomic_write)."""
    for folder in ("", "scores", "shards"):
        url = join(out, folder) if folder else out
        if exists(url, storage_options):
            fs, path = filesystem(url, storage_options)
            for leftover in fs.glob(f"{path.rstrip('/')}/*.tmp-*"):
                fs.rm(leftover)


def selection_hash(out: str, storage_options: dict) -> str:
    with open_input(join(out, "selection.parquet"), storage_options) as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
