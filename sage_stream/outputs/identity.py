"""Run identity: what the contents of OUT depend on, defined once.

Two identities, one nested in the other:

- the *sketch identity* is what must match for a stored sketch to be used with this run: the
  model's fingerprint, the gradient configuration, the head, D and C. It lives in the sketch
  store's attributes and is checked on every open, and on every Ray partial before a merge.
- the *run identity* is the sketch's options plus what is read (inputs and their pins: size
  and mtime or ETag when listed; keys, preprocess, limits) and how pass 2 scores. It is written to OUT/_work/run.json when OUT is claimed and
  kept in manifest.json; a rerun with another one is refused unless --overwrite.

A step that finishes an earlier run (select, emit) is given that run's inputs: `run_inputs`
checks them against the stored identity and takes the pins from it.

The selection (keep, balance, min_score) is not part of either: it may be redone on the same
scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import RECORDED_WHEN_SET, Config
from ..errors import MismatchError
from ..inputs import expand_inputs
from ..sample import ShardRef
from ..select.rules import SKETCHED
from ..storage import pin_of
from .folder import OutputFolder

# The manifest records these under "selection", not under "config".
SELECTION_FIELDS = ("keep", "balance", "min_score")


def sketch_options(cfg: Config) -> dict[str, Any]:
    """The options that make two sketches comparable, besides the model's weights and D."""
    return {
        "grad": cfg.grad,
        "head": cfg.head,
        "params": cfg.params if cfg.grad == "params" else None,
        "project_dim": cfg.project_dim,
        "seed": cfg.seed if cfg.project_dim else None,
        "ell": cfg.ell,
        "precision": cfg.precision,
        # newer options, only when set (so that earlier sketches keep their identity)
        **({"model_args": cfg.describe()["model_args"]} if cfg.model_args else {}),
        **({"output_key": cfg.output_key} if cfg.output_key is not None else {}),
    }


def sketch_identity(
    cfg: Config, fingerprint: str, head: str | None, dim: int, classes: int
) -> dict[str, Any]:
    """Everything that must match for a stored sketch to be usable with this run."""
    return {"model": fingerprint, **sketch_options(cfg), "head": head, "dim": dim,
            "classes": classes}  # fmt: skip


def run_identity(cfg: Config, refs: list[ShardRef], fingerprint: str) -> dict[str, Any]:
    """What the contents of OUT depend on, besides the selection (which may be redone)."""
    described = cfg.describe()
    return {
        "inputs": [ref.url for ref in refs],
        "pins": [ref.pin for ref in refs],  # what each shard held when listed (storage.pin_of)
        "model": fingerprint,
        **{k: described[k] for k in ("input_key", "label_key", "key_column", "preprocess")},
        **{k: described[k] for k in RECORDED_WHEN_SET if k in described},
        "max_member_bytes": cfg.max_member_bytes,
        "max_sample_bytes": cfg.max_sample_bytes,
        **sketch_options(cfg),
        "batch_size": cfg.batch_size,
        "consensus": cfg.consensus,
        "sketched": cfg.scorer in SKETCHED,  # sage and sage-coverage share one scores/
    }


def run_config(cfg: Config) -> dict[str, Any]:
    """The configuration the manifest records: that of the command which made the scores."""
    return {k: v for k, v in cfg.describe().items() if k not in SELECTION_FIELDS}


def pinned(refs: list[ShardRef], cfg: Config) -> list[ShardRef]:
    """The shards with what they hold now (storage.pin_of): part of the run identity, and
    checked by every later open of the shard."""
    return [dataclasses.replace(r, pin=pin_of(r.url, cfg.storage_options)) for r in refs]


def run_inputs(cfg: Config, folder: OutputFolder) -> list[ShardRef]:
    """The inputs of a step that finishes an earlier run: they must be that run's inputs, or
    the scores of one data set would be attached to another's samples."""
    refs = expand_inputs(cfg.inputs, cfg.storage_options)
    folder.refuse_inputs_inside(refs)
    stored = folder.stored_identity()
    if stored is not None and [r.url for r in refs] != stored["inputs"]:
        raise MismatchError(
            f"these inputs are not the ones {cfg.out} was scored from ({len(refs)} shards "
            f"given, {len(stored['inputs'])} in the run): pass the run's inputs, in order"
        )
    pins = (stored or {}).get("pins")
    if pins is None:  # made before inputs were pinned: nothing to check against
        return pinned(refs, cfg)
    return [dataclasses.replace(r, pin=p) for r, p in zip(refs, pins, strict=True)]
