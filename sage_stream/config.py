"""The run's configuration: one frozen dataclass, filled from keyword arguments, a TOML file
(`--config`) and command-line flags, validated once at the edge.

Which fields make up the identity of a sketch and of a run (so that two runs that differ in
them are never mixed) is said once, in `outputs.identity`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .decode.images import check_options
from .errors import InputError
from .outputs.folder import OutputFolder
from .select.rules import BALANCES, DEDUP, SCORERS, check_amount
from .storage import exists, open_input
from .units import byte_size

GRAD_MODES = ("last-layer", "params")
PREDICTED = "predicted"  # --label-key predicted: the model's own argmax is each sample's label
# How a run is carried out, not what it computes: left out of the manifest, so that the same
# run resumed, run elsewhere, or on one Ray worker, writes the same bytes.
HOW_NOT_WHAT = (
    "out",
    "progress",
    "overwrite",
    "force_unlock",
    "checkpoint_every",
    "executor",
    "workers",
    "loader_workers",
)
# Options added after outputs already existed: recorded (manifest, run identity) only when set,
# so that a run that does not use them writes the same bytes as before they existed.
RECORDED_WHEN_SET = (
    "resize", "crop", "normalize", "image_mode", "model_args", "output_key", "tokenizer",
    "max_length",
)  # fmt: skip
BYTE_FIELDS = ("max_member_bytes", "max_sample_bytes")  # units accepted: units.byte_size
NUMERIC_FIELDS: dict[str, type] = {
    "resize": int, "crop": int, "max_length": int,
    "project_dim": int, "ell": int, "batch_size": int, "chunk_size": int, "seed": int,
    "workers": int, "loader_workers": int, "keep": float,
    "min_score": float, "checkpoint_every": float,
}  # fmt: skip
CONSENSUS = ("mean-gradient", "centroid")
ON_ERROR = ("skip", "fail")
EXECUTORS = ("local", "ray")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Config:
    inputs: tuple[str, ...] = ()
    out: str = ""
    model: Any = None  # "module:function", a callable, or an nn.Module
    checkpoint: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)  # the factory's keyword arguments
    output_key: str | None = None  # the logits' entry in the model's output (default: found)
    input_key: str | None = None
    label_key: str | None = "cls"  # None (`none`): unlabeled, every sample class 0
    key_column: str = "__key__"  # Parquet: the column holding the sample key, if any
    preprocess: Any = None  # "module:function" or a callable: Sample -> (tensor, label)
    resize: int | None = None  # images: shorter side to N pixels (decode/images.py)
    crop: int | None = None  # images: centre N×N
    normalize: str | None = None  # images: imagenet | none | MEAN,STD | M1,M2,M3,S1,S2,S3
    image_mode: str | None = None  # images: RGB | L (default: L stays L, else RGB)
    tokenizer: str | None = None  # text: a local tokenizer folder or .json file (decode/text.py)
    max_length: int | None = None  # text: tokens per sample (default 512)
    grad: str = "last-layer"
    head: str | None = None
    params: str | None = None
    project_dim: int | None = None
    ell: int = 256
    batch_size: int = 64
    chunk_size: int = 64
    device: str = "auto"
    precision: str = "fp32"  # the model's forward (autocast); features and sketch stay fp32+
    loader_workers: int | None = None  # decode processes; None: from the cores (loader.py)
    seed: int = 0
    on_error: str = "skip"
    max_member_bytes: int = 256 * 2**20
    max_sample_bytes: int = 512 * 2**20  # all members of one tar sample together
    storage_options: dict[str, Any] = field(default_factory=dict)
    executor: str = "local"
    workers: int | None = None  # --executor ray: actors (default: one per GPU, else 2)
    scorer: str = "sage-coverage"  # with --min-score: a threshold on the agreement, as sage
    consensus: str = "mean-gradient"
    keep: float | None = None
    balance: str = "proportional"
    dedup: str = "off"  # near-copy removal (select/dedup.py): off | on, for any scorer
    min_score: float | None = None
    overwrite: bool = False
    force_unlock: bool = False  # break OUT/_LEASE left by a run that is gone (outputs.lease)
    checkpoint_every: float = 60.0  # seconds between pass-1 checkpoints (0: after every shard)
    progress: bool | None = None  # None: a bar on a terminal, log lines otherwise

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self._coerce_label_key()
        _check_choice("grad", self.grad, GRAD_MODES)
        _check_choice("consensus", self.consensus, CONSENSUS)
        _check_choice("on-error", self.on_error, ON_ERROR)
        _check_choice("executor", self.executor, EXECUTORS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("scorer", self.scorer, SCORERS)
        _check_choice("balance", self.balance, BALANCES)
        _check_choice("dedup", self.dedup, DEDUP)
        for name in ("ell", "batch_size", "chunk_size", "max_member_bytes", "max_sample_bytes"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise InputError("--loader-workers must be 0 (decode in this process) or more")
        if self.workers is not None and self.workers < 1:
            raise InputError("--workers must be a positive integer")
        if self.project_dim is not None and self.project_dim < 1:
            raise InputError("--project-dim must be a positive integer")
        if not self.checkpoint_every >= 0:  # `not >=`: NaN too
            raise InputError("--checkpoint-every must be 0 (after every shard) or more seconds")
        check_amount(self.keep, self.min_score)  # the selection's own rule (select/rules.py)
        check_options(self.resize, self.crop, self.normalize, self.image_mode)
        if not isinstance(self.model_args, dict):
            raise InputError(
                f"model_args must be a table of keyword arguments, not {self.model_args!r}"
            )
        if self.tokenizer is not None and self.preprocess is not None:
            raise InputError("give --tokenizer or --preprocess, not both")
        if self.max_length is not None and self.max_length < 1:
            raise InputError("--max-length must be a positive number of tokens")
        if self.params and self.grad != "params":
            raise InputError("--params only applies with --grad params")

    def _coerce_numbers(self) -> None:
        """`keep=1` and `keep=1.0` are one run: numbers take their field's type (frozen, so
        via object.__setattr__), or a bad value is an InputError naming the option."""
        for name, kind in NUMERIC_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                object.__setattr__(self, name, kind(value))
            except (TypeError, ValueError):
                flag = name.replace("_", "-")
                raise InputError(f"--{flag} expects a number, got {value!r}") from None
        for name in BYTE_FIELDS:
            flag = "--" + name.replace("_", "-")
            object.__setattr__(self, name, byte_size(getattr(self, name), flag))

    def _coerce_label_key(self) -> None:
        """`--label-key none` (any case; TOML `label-key = "none"`) means unlabeled: one class;
        `predicted` (kept as is) labels each sample with the model's argmax."""
        key = self.label_key
        if isinstance(key, str) and key.strip().lower() == "none":
            object.__setattr__(self, "label_key", None)
        elif key is not None and not isinstance(key, str):
            raise InputError(
                f"--label-key expects a field name, or none for unlabeled data; got {key!r}"
            )
        elif isinstance(key, str) and not key.strip():
            raise InputError("--label-key is empty: give a field name, or none")

    @property
    def output(self) -> OutputFolder:
        """OUT, with the storage options it is read and written with."""
        return OutputFolder(self.out, self.storage_options)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-able view for the manifest (callables shown by name; no storage secrets).

        HOW_NOT_WHAT is left out (`out` too: the manifest lives in OUT, and a copy stays valid).
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in HOW_NOT_WHAT or (f.name in RECORDED_WHEN_SET and value in (None, {})):
                continue
            if f.name == "storage_options":
                value = sorted(value)  # keys only: values may be credentials
            elif f.name == "model_args":
                value = {k: value[k] for k in sorted(value)}
            elif value is not None and not isinstance(value, str | int | float | bool | tuple):
                value = getattr(value, "__qualname__", type(value).__name__)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def shard_options(options: Config | Mapping[str, Any], fmt: str) -> dict[str, Any]:
    """The reader options of one shard format, from a Config or from the `config` a manifest
    recorded (for reading, for copying kept samples out, and for reading them back)."""

    def get(name: str) -> Any:
        if isinstance(options, Config):
            return getattr(options, name)
        value = options.get(name)
        return getattr(Config, name) if value is None else value

    if fmt == "tar":
        return {"max_member_bytes": int(get("max_member_bytes")),
                "max_sample_bytes": int(get("max_sample_bytes"))}  # fmt: skip
    return {"key_column": get("key_column")}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"--{name} {value!r}: choose one of {', '.join(choices)}")


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Config))


def make_config(**options: Any) -> Config:
    """Config from keyword arguments; unknown names are an error, not silently ignored."""
    unknown = sorted(set(options) - FIELD_NAMES)
    if unknown:
        raise InputError(f"unknown option(s): {', '.join(unknown)}")
    if "inputs" in options and isinstance(options["inputs"], str):
        options["inputs"] = (options["inputs"],)
    if "inputs" in options:
        options["inputs"] = tuple(options["inputs"])
    return Config(**options)


def load_toml(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Options from a TOML file; keys use the CLI's names with - or _ (`label-key`)."""
    if not exists(url, storage_options):
        raise InputError(f"config file {url} does not exist")
    with open_input(url, storage_options) as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"config file {url}: {exc}") from None
    options = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(options) - FIELD_NAMES)
    if unknown:
        raise InputError(f"config file {url}: unknown key(s) {', '.join(unknown)}")
    return options
