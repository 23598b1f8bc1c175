"""The run's configuration: one frozen dataclass, filled from keyword arguments, a TOML file
(`--config`) and command-line flags, validated once at the edge.

Each option is defined once, as a field made by `option`: its default, its help, the CLI group
and flag, the steps that use it, its choices, its numeric type or parser, and its check. The
CLI parser (cli.py), TOML loading (`load_toml`, the same names with - or _) and validation
(`Config.__post_init__`) are derived from it; the API's keyword signatures are checked against
it by tests/test_options.py.

Which fields make up the identity of a sketch and of a run (so that two runs that differ in
them are never mixed) is said once, in `outputs.identity`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .decode.images import IMAGE_MODES, check_options
from .errors import InputError
from .formats import format_named
from .select.rules import BALANCES, DEDUP, SCORERS, check_amount
from .storage import exists, open_input
from .units import byte_size

PREDICTED = "predicted"  # --label-key predicted: the model's own argmax is each sample's label
# How a run is carried out, not what it computes: left out of the manifest, so that the same
# run resumed, run elsewhere, or on one Ray worker, writes the same bytes.
HOW_NOT_WHAT = (
    "out", "progress", "overwrite", "force_unlock", "checkpoint_every", "executor", "workers",
    "loader_workers", "feature_cache",
)  # fmt: skip
# Options added after outputs already existed: recorded (manifest, run identity) only when set,
# so that a run that does not use them writes the same bytes as before they existed.
RECORDED_WHEN_SET = (
    "resize", "crop", "normalize", "image_mode", "model_args", "output_key", "tokenizer",
    "max_length",
)  # fmt: skip
GRAD_MODES = ("last-layer", "params")
CONSENSUS = ("mean-gradient", "centroid")
ON_ERROR = ("skip", "fail")
EXECUTORS = ("local", "ray")
PRECISIONS = ("fp32", "bf16", "fp16")

# The step commands that take an option (the API's functions of the same names take exactly
# these as keywords: tests/test_options.py checks it).
ALL = ("run", "sketch", "score", "select", "emit")
PASSES = ("run", "sketch", "score")  # the steps that run the model
READS = ("run", "sketch", "score", "emit")  # the steps that read the shards
SELECTS = ("run", "select")


def _at_least(low: int, message: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if int(value) < low:
            raise InputError(f"--{name.replace('_', '-')} {message}")

    return check


POSITIVE = _at_least(1, "must be a positive integer")


def _seconds(name: str, value: float) -> None:
    if not value >= 0:  # `not >=`: NaN too
        raise InputError(
            f"--{name.replace('_', '-')} must be 0 (after every shard) or more seconds"
        )


def option(
    default: Any,
    help: str,  # noqa: A002 - argparse's name for it
    *,
    steps: tuple[str, ...],
    group: str,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    kind: type | None = None,
    parse: Callable[[Any, str], Any] | None = None,
    check: Callable[[str, Any], None] | None = None,
    flag: str | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A Config field with everything about the option: its default, its CLI help, group and
    flag (default ``--name-with-dashes``), the steps that use it, its choices, the numeric type
    it is coerced to (`kind`, also the flag's type) or the parser of its value (`parse`, given
    the value and the flag: units.byte_size), and a check of its value (applied when it is not
    None)."""
    meta = {"help": help, "steps": steps, "group": group, "metavar": metavar, "choices": choices,
            "kind": kind, "parse": parse, "check": check, "flag": flag}  # fmt: skip
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


INPUT, IMAGES, TEXT = (
    "input",
    "images (built-in decoder; see docs/inputs.md)",
    "text (see docs/inputs.md)",
)
DECODING, MODEL = "decoding and batching", "model and gradients"
SELECTION, RUN = "selection", "run"


@dataclass(frozen=True)
class Config:
    """Every option of a run, with its help and check (`option`); validated on creation."""

    inputs: tuple[str, ...] = option(
        (), "shard URL, brace pattern (shard-{000..099}.tar), glob, folder, or @list.txt",
        steps=ALL, group=INPUT, metavar="INPUT", factory=tuple,
    )  # fmt: skip
    out: str = option("", "output folder or URL (or `out` in --config)", steps=ALL, group=RUN,
                      metavar="URL")  # fmt: skip
    model: Any = option(  # "module:function", a callable, or an nn.Module
        None, "factory returning the nn.Module (proxy model) that judges the samples; the "
        "current folder is importable", steps=PASSES, group=MODEL, metavar="MOD:FN",
    )  # fmt: skip
    checkpoint: str | None = option(
        None, "state dict for the model (loaded with weights_only=True)", steps=PASSES,
        group=MODEL, metavar="URL",
    )  # fmt: skip
    model_args: dict[str, Any] = option(  # the factory's keyword arguments
        None, "keyword argument for the factory, repeatable (num_classes=10, pretrained=false, "
        "model_name=resnet18); numbers, true/false and none are parsed", steps=PASSES,
        group=MODEL, metavar="K=V", flag="--model-arg", factory=dict,
    )  # fmt: skip
    output_key: str | None = option(  # the logits' entry in the model's output (default: found)
        None, "the logits in the model's output: a dict key, attribute or tuple index "
        "(default: the tensor itself, .logits, or a tuple's first element)", steps=PASSES,
        group=MODEL, metavar="KEY",
    )  # fmt: skip
    input_key: str | None = option(
        None, "member/column holding the input (default: the one .npy/.png/.jpg/.webp member, "
        "or the list column)", steps=PASSES, group=INPUT,
    )  # fmt: skip
    label_key: str | None = option(  # None (`none`): unlabeled, every sample class 0
        "cls", "member/column holding the integer label (default cls; a.b for a struct "
        "member); none: unlabeled, one class; predicted: the model's argmax as each sample's "
        "label", steps=PASSES, group=INPUT,
    )  # fmt: skip
    key_column: str = option(  # Parquet: the column holding the sample key, if any
        "__key__", "Parquet column with the sample key (default __key__; row numbers if "
        "absent)", steps=READS, group=INPUT,
    )  # fmt: skip
    preprocess: Any = option(  # "module:function" or a callable: Sample -> (tensor, label)
        None, "function Sample -> (tensor, label) for inputs the built-in decoders do not "
        "handle", steps=PASSES, group=INPUT, metavar="MOD:FN",
    )  # fmt: skip
    resize: int | None = option(  # decode/images.py
        None, "shorter side to N pixels, aspect kept", steps=PASSES, group=IMAGES,
        metavar="N", kind=int,
    )  # fmt: skip
    crop: int | None = option(None, "centre N×N crop (after --resize)", steps=PASSES,
                              group=IMAGES, metavar="N", kind=int)  # fmt: skip
    normalize: str | None = option(
        None, "imagenet, none (default), MEAN,STD or M1,M2,M3,S1,S2,S3 per channel",
        steps=PASSES, group=IMAGES, metavar="STATS",
    )  # fmt: skip
    image_mode: str | None = option(
        None, "convert images to RGB or L (default: L stays L, all else RGB)", steps=PASSES,
        group=IMAGES, choices=IMAGE_MODES,
    )  # fmt: skip
    tokenizer: str | None = option(  # decode/text.py
        None, "local Hugging Face tokenizer folder or tokenizers .json file: the input field "
        "(--input-key, default text) is tokenized for the model (input_ids, attention_mask)",
        steps=PASSES, group=TEXT, metavar="PATH",
    )  # fmt: skip
    max_length: int | None = option(
        None, "tokens per sample (default 512)", steps=PASSES, group=TEXT, metavar="N",
        kind=int, check=_at_least(1, "must be a positive number of tokens"),
    )  # fmt: skip
    grad: str = option(
        "last-layer", "last-layer (default): closed form for the final Linear; params: "
        "torch.func over --params", steps=PASSES, group=MODEL, choices=GRAD_MODES,
    )  # fmt: skip
    head: str | None = option(None, "name of the Linear head for last-layer (default: the "
                              "last)", steps=PASSES, group=MODEL)  # fmt: skip
    params: str | None = option(None, "parameters for --grad params ('*' = all)", steps=PASSES,
                                group=MODEL, metavar="GLOB")  # fmt: skip
    project_dim: int | None = option(
        None, "random-project gradients to K", steps=PASSES, group=MODEL, metavar="K",
        kind=int, check=POSITIVE,
    )  # fmt: skip
    ell: int = option(256, "sketch size ℓ (default 256)", steps=PASSES, group=MODEL,
                      metavar="N", kind=int, check=POSITIVE)  # fmt: skip
    batch_size: int = option(64, "samples per model batch (default 64)", steps=PASSES,
                             group=DECODING, kind=int, check=POSITIVE)  # fmt: skip
    chunk_size: int = option(64, "vmap chunk for --grad params (default 64)", steps=PASSES,
                             group=MODEL, kind=int, check=POSITIVE)  # fmt: skip
    device: str = option("auto", "auto (default: CUDA if present), cpu or cuda", steps=PASSES,
                         group=MODEL)  # fmt: skip
    precision: str = option(  # the model's forward (autocast); features and sketch stay fp32+
        "fp32", "the model's forward under autocast: fp32 (default), bf16 (recommended on "
        "CUDA), fp16; gradient features and the sketch stay float32", steps=PASSES,
        group=MODEL, choices=PRECISIONS,
    )  # fmt: skip
    loader_workers: int | None = option(  # decode processes; None: from the cores (loader.py)
        None, "processes that read and decode shards (0: in this process; default: up to 8 "
        "spare cores beside a GPU, 0 on a CPU node); outputs are the same for any N",
        steps=READS, group=DECODING, metavar="N", kind=int,
        check=_at_least(0, "must be 0 (decode in this process) or more"),
    )  # fmt: skip
    seed: int = option(
        0, "seed for projection, the seeded draws of random and sage-coverage, and the model's "
        "starting weights when there is no --checkpoint (default 0)",
        steps=("run", "sketch", "score", "select"), group=RUN, kind=int,
    )  # fmt: skip
    on_error: str = option(
        "skip", "skip (default): record a bad sample or shard and go on; fail: stop at the "
        "first, naming shard and key", steps=PASSES, group=DECODING, choices=ON_ERROR,
    )  # fmt: skip
    max_member_bytes: int = option(
        256 * 2**20, "a tar member larger than this (default 256 MiB) makes its sample an error "
        "row; a size in bytes or with a unit: 1GiB, 512MiB, 2GB", steps=READS, group=DECODING,
        metavar="SIZE", parse=byte_size, check=POSITIVE,
    )  # fmt: skip
    max_sample_bytes: int = option(  # all members of one tar sample together
        512 * 2**20, "a tar sample whose members add up to more (default 512 MiB) is an error "
        "row; sizes come from the headers, so nothing over the limit is read", steps=READS,
        group=DECODING, metavar="SIZE", parse=byte_size, check=POSITIVE,
    )  # fmt: skip
    storage_options: dict[str, Any] = option(
        None, "fsspec option, repeatable (e.g. endpoint_url=http://...)", steps=ALL, group=RUN,
        metavar="K=V", flag="--storage-option", factory=dict,
    )  # fmt: skip
    executor: str = option("local", "local (default) or ray", steps=READS, group=MODEL,
                           choices=EXECUTORS)  # fmt: skip
    workers: int | None = option(
        None, "--executor ray: actors (default: one per GPU, else 2)", steps=READS,
        group=MODEL, metavar="N", kind=int, check=POSITIVE,
    )  # fmt: skip
    scorer: str = option(  # with --min-score: a threshold on the agreement, as sage
        "sage-coverage", "sage-coverage (default: a sample whose head input lies nearer another "
        "class's mean than its own is set aside as likely mislabelled, a seeded draw picks "
        "among the rest; with --min-score, a threshold on the agreement), sage (highest agreement with the class consensus first), or a baseline: "
        "loss, loss-easy, grad-norm, random", steps=ALL, group=RUN, choices=SCORERS,
    )  # fmt: skip
    consensus: str = option("mean-gradient", "mean-gradient (default) or centroid",
                            steps=PASSES, group=MODEL, choices=CONSENSUS)  # fmt: skip
    keep: float | None = option(None, "fraction of scored samples to keep", steps=SELECTS,
                                group=SELECTION, metavar="F", kind=float)  # fmt: skip
    balance: str = option(
        "proportional", "proportional (default): keep the class mix; equal: same count per "
        "class; none: global top", steps=SELECTS, group=SELECTION, choices=BALANCES,
    )  # fmt: skip
    dedup: str = option(  # near-copy removal (select/dedup.py)
        "off", "near-copies within a class (signatures of the head's input closer than 7%% of "
        "a typical pair) rank after every other sample, recorded in OUT/duplicates.parquet: "
        "off (default) or on, for any scorer", steps=SELECTS, group=SELECTION, choices=DEDUP,
    )  # fmt: skip
    min_score: float | None = option(None, "keep every sample scoring >= T", steps=SELECTS,
                                     group=SELECTION, metavar="T", kind=float)  # fmt: skip
    overwrite: bool = option(False, "replace an output made with another configuration",
                             steps=PASSES, group=RUN)  # fmt: skip
    force_unlock: bool = option(  # break OUT/_LEASE left by a run that is gone (outputs.lease)
        False, "break OUT/_LEASE, the claim of the one run writing OUT; only when that run is "
        "gone (a lease of a dead process on this host is taken over without it)", steps=ALL,
        group=RUN,
    )  # fmt: skip
    feature_cache: int = option(  # bytes of OUT/_work/kept/ in all (passes/kept.py)
        16 * 2**30, "disk pass 1 may use in OUT/_work/ to keep each sample's head input and "
        "logits, so that pass 2 need not read, decode and run the model again (last-layer "
        "mode; (H + C) x 4 bytes a sample; default 16GiB; 0: pass 2 reads the shards again); "
        "same results either way", steps=("run", "sketch"), group=RUN, metavar="SIZE",
        parse=byte_size, check=_at_least(0, "must be 0 (keep nothing) or a size"))  # fmt: skip
    checkpoint_every: float = option(  # seconds between pass-1 checkpoints (0: every shard)
        60.0, "pass-1 checkpoint interval, for resume (default 60; 0: after every shard)",
        steps=PASSES, group=RUN, metavar="SECONDS", kind=float, check=_seconds,
    )  # fmt: skip
    progress: bool | None = option(  # None: a bar on a terminal, log lines otherwise
        None, "log lines instead of progress bars", steps=READS, group=RUN, flag="--no-progress",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self._coerce_numbers()
        self._coerce_label_key()
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), f.name.replace("_", "-")
            if value is None:
                continue
            if f.metadata["choices"] is not None:
                _check_choice(name, value, f.metadata["choices"])
            if f.metadata["check"] is not None:
                f.metadata["check"](f.name, value)
        check_amount(self.keep, self.min_score)  # the selection's own rule (select/rules.py)
        check_options(self.resize, self.crop, self.normalize, self.image_mode)
        if not isinstance(self.model_args, dict):
            raise InputError(
                f"model_args must be a table of keyword arguments, not {self.model_args!r}"
            )
        if self.tokenizer is not None and self.preprocess is not None:
            raise InputError("give --tokenizer or --preprocess, not both")
        if self.params and self.grad != "params":
            raise InputError("--params only applies with --grad params")

    def _coerce_numbers(self) -> None:
        """`keep=1` and `keep=1.0` are one run: numbers take their field's type and sizes are
        parsed (`1GiB`; frozen, so via object.__setattr__), or a bad value is an InputError
        naming the option."""
        for f in dataclasses.fields(self):
            name, value, meta = f.name, getattr(self, f.name), f.metadata
            flag = "--" + name.replace("_", "-")
            if value is None:
                continue
            if meta["parse"] is not None:  # a size with a unit (units.byte_size)
                object.__setattr__(self, name, meta["parse"](value, flag))
            elif meta["kind"] is not None:
                try:
                    object.__setattr__(self, name, meta["kind"](value))
                except (TypeError, ValueError):
                    raise InputError(f"{flag} expects a number, got {value!r}") from None

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

    return {name: kind(get(name)) for name, kind in format_named(fmt).options.items()}


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
