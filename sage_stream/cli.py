"""`sage-stream`: the command line, a thin layer over `sage_stream.api`.

Options come from three places, later ones winning: the defaults of `Config`, a TOML file
(`--config`), and the flags given. Expected errors (bad input, bad options, a sketch from
another model) print one line and exit 2; a traceback means a bug.

Stopping: SIGINT (Ctrl-C) and SIGTERM (what `docker stop`, Kubernetes, systemd and Slurm
send) stop a step the same way: the exception unwinds through the step, which discards its
half-written temporaries and releases OUT/_LEASE, and the same command resumes where it
stopped, from any host. The exit code says which: 130 for SIGINT, 143 (128 + 15) for SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from . import api
from .config import (
    BALANCES,
    CONSENSUS,
    DEDUP,
    EXECUTORS,
    GRAD_MODES,
    ON_ERROR,
    PRECISIONS,
    SCORERS,
    load_toml,
    make_config,
)  # fmt: skip
from .errors import InputError, SageError

DESCRIPTION = """\
Keep the training samples whose gradients agree with their class, drop the rest.

Reads WebDataset .tar or Parquet shards (local, s3://, gs://, memory://), sketches per-sample
gradients of your model in one streaming pass, scores every sample in a second pass, and writes
a smaller shard set that any WebDataset or Parquet reader loads unchanged.

  sage-stream demo                                          try it on real digits, seconds on a CPU
  sage-stream run 'data/shard-{000..099}.tar' --model mymodels:net --checkpoint net.pt \\
      --out s3://bucket/selected --keep 0.3                  all steps
  sage-stream inspect OUT                                   what a run wrote
  sage-stream report OUT                                    HTML page of what it kept
"""


def _add_data(p: argparse.ArgumentParser, inputs: str) -> None:
    g = p.add_argument_group("input")
    if inputs:
        g.add_argument(
            "inputs",
            nargs=inputs,
            metavar="INPUT",
            help="shard URL, brace pattern (shard-{000..099}.tar), glob, folder, or @list.txt",
        )
    g.add_argument(
        "--input-key",
        help="member/column holding the input (default: the one "
        ".npy/.png/.jpg/.webp member, or the list column)",
    )
    g.add_argument(
        "--label-key",
        help="member/column holding the integer label (default cls; a.b for a struct member); "
        "none: unlabeled, one class; predicted: the model's argmax as each sample's label",
    )
    g.add_argument(
        "--key-column",
        help="Parquet column with the sample key (default __key__; row numbers if absent)",
    )
    g.add_argument(
        "--preprocess",
        metavar="MOD:FN",
        help="function Sample -> (tensor, label) for inputs the built-in decoders do not handle",
    )
    g = p.add_argument_group("images (built-in decoder; see docs/inputs.md)")
    g.add_argument("--resize", type=int, metavar="N", help="shorter side to N pixels, aspect kept")
    g.add_argument("--crop", type=int, metavar="N", help="centre N×N crop (after --resize)")
    g.add_argument(
        "--normalize",
        metavar="STATS",
        help="imagenet, none (default), MEAN,STD or M1,M2,M3,S1,S2,S3 per channel",
    )
    g.add_argument(
        "--image-mode",
        choices=("RGB", "L"),
        help="convert images to RGB or L (default: L stays L, all else RGB)",
    )
    g = p.add_argument_group("text (see docs/inputs.md)")
    g.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="local Hugging Face tokenizer folder or tokenizers .json file: the input field "
        "(--input-key, default text) is tokenized for the model (input_ids, attention_mask)",
    )
    g.add_argument("--max-length", type=int, metavar="N", help="tokens per sample (default 512)")
    g = p.add_argument_group("decoding and batching")
    g.add_argument(
        "--on-error",
        choices=ON_ERROR,
        help="skip (default): record a bad sample or "
        "shard and go on; fail: stop at the first, naming shard and key",
    )
    g.add_argument(
        "--max-member-bytes",
        metavar="SIZE",
        help="a tar member larger than this (default 256 MiB) makes its sample an error row; "
        "a size in bytes or with a unit: 1GiB, 512MiB, 2GB",
    )
    g.add_argument(
        "--max-sample-bytes",
        metavar="SIZE",
        help="a tar sample whose members add up to more (default 512 MiB) is an error row; "
        "sizes come from the headers, so nothing over the limit is read",
    )
    g.add_argument("--batch-size", type=int, help="samples per model batch (default 64)")
    g.add_argument(
        "--loader-workers",
        type=int,
        metavar="N",
        help="processes that read and decode shards (0: in this process; default: up to 8 "
        "spare cores beside a GPU, 0 on a CPU node); outputs are the same for any N",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and gradients")
    g.add_argument(
        "--model",
        metavar="MOD:FN",
        help="factory returning the nn.Module (proxy "
        "model) that judges the samples; the current folder is importable",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        metavar="K=V",
        help="keyword argument for the factory, repeatable (num_classes=10, pretrained=false, "
        "model_name=resnet18); numbers, true/false and none are parsed",
    )
    g.add_argument(
        "--output-key",
        metavar="KEY",
        help="the logits in the model's output: a dict key, attribute or tuple index "
        "(default: the tensor itself, .logits, or a tuple's first element)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="URL",
        help="state dict for the model (loaded with weights_only=True)",
    )
    g.add_argument(
        "--grad",
        choices=GRAD_MODES,
        help="last-layer (default): closed form for "
        "the final Linear; params: torch.func over --params",
    )
    g.add_argument("--head", help="name of the Linear head for last-layer (default: the last)")
    g.add_argument("--params", metavar="GLOB", help="parameters for --grad params ('*' = all)")
    g.add_argument("--project-dim", type=int, metavar="K", help="random-project gradients to K")
    g.add_argument("--ell", type=int, metavar="N", help="sketch size ℓ (default 256)")
    g.add_argument("--chunk-size", type=int, help="vmap chunk for --grad params (default 64)")
    g.add_argument("--device", help="auto (default: CUDA if present), cpu or cuda")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="the model's forward under autocast: fp32 (default), bf16 (recommended on "
        "CUDA), fp16; gradient features and the sketch stay float32",
    )
    g.add_argument("--consensus", choices=CONSENSUS, help="mean-gradient (default) or centroid")
    g.add_argument("--executor", choices=EXECUTORS, help="local (default) or ray")
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="--executor ray: actors (default: one per GPU, else 2)",
    )


def _add_select(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection")
    g.add_argument("--keep", type=float, metavar="F", help="fraction of scored samples to keep")
    g.add_argument("--min-score", type=float, metavar="T", help="keep every sample scoring >= T")
    g.add_argument(
        "--balance",
        choices=BALANCES,
        help="proportional (default): keep the class "
        "mix; equal: same count per class; none: global top",
    )
    g.add_argument(
        "--dedup",
        choices=DEDUP,
        help="near-copies within a class (signatures of the head's input closer than 7%% of a "
        "typical pair) rank after every other sample, recorded in OUT/duplicates.parquet: off "
        "(default) or on, for any scorer",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="URL", help="output folder or URL (or `out` in --config)")
    g.add_argument("--config", metavar="FILE.toml", help="options from a TOML file; flags win")
    g.add_argument(
        "--storage-option",
        action="append",
        metavar="K=V",
        default=[],
        help="fsspec option, repeatable (e.g. endpoint_url=http://...)",
    )
    g.add_argument(
        "--scorer",
        choices=SCORERS,
        help="sage-coverage (default: agreement and ridge leverage from the sketch set aside "
        "the likely-wrong samples, a seeded draw weighted by the leverage of each gradient's "
        "direction picks among the rest; with "
        "--min-score, a threshold on the agreement), sage (highest agreement with the class "
        "consensus first), or a baseline: loss, loss-easy, grad-norm, random",
    )
    g.add_argument(
        "--seed",
        type=int,
        help="seed for projection, the seeded draws of random and sage-coverage, and the "
        "model's starting weights when there is no --checkpoint (default 0)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an output made with another configuration",
    )
    g.add_argument(
        "--force-unlock",
        action="store_true",
        default=None,
        help="break OUT/_LEASE, the claim of the one run writing OUT; only when that run is "
        "gone (a lease of a dead process on this host is taken over without it)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=float,
        metavar="SECONDS",
        help="pass-1 checkpoint interval, for resume (default 60; 0: after every shard)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="log lines instead of progress bars",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="print the plan (inputs and their pinned sizes, what OUT holds, the steps that "
        "would run or be skipped) and write nothing",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-stream",
        description=DESCRIPTION,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    steps = {
        "run": ("all steps: sketch, score, select, emit", "*", True, True),
        "sketch": ("pass 1: per-sample gradients -> FD sketch (OUT/sketch.zarr)", "*", True, False),
        "score": ("pass 2: a score for every sample (OUT/scores/)", "*", True, False),
        "select": ("choose the kept samples (OUT/selection.parquet, decisions/)", "*", False, True),
        "emit": ("write kept samples to OUT/shards/, manifest, _SUCCESS", "*", False, False),
    }
    for name, (text, nargs, model, selection) in steps.items():
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        _add_data(p, nargs)
        if model:
            _add_model(p)
        if selection:
            _add_select(p)
        _add_common(p)
    p = sub.add_parser(
        "inspect", allow_abbrev=False, help="summary of a sketch, a scores table or a run's output"
    )
    p.add_argument("url", help="OUT, OUT/sketch.zarr, OUT/scores, or a scores part")
    p.add_argument(
        "--key",
        metavar="KEY",
        help="with OUT: that sample's scores row, whether it was kept, and its class's cut",
    )
    p.add_argument("--storage-option", action="append", metavar="K=V", default=[])
    p = sub.add_parser(
        "report",
        allow_abbrev=False,
        help="HTML page + PNG figures of what a run kept (OUT/report/)",
    )
    p.add_argument("out", metavar="OUT", help="a finished run's output folder or URL")
    p.add_argument("--top", type=int, default=12, help="most/least agreeing samples shown (12)")
    p.add_argument("--storage-option", action="append", metavar="K=V", default=[])
    p = sub.add_parser(
        "demo",
        allow_abbrev=False,
        help="the whole stage on real handwritten digits, on this machine",
    )
    p.add_argument("--out", default="sage-demo", help="folder for data and results (sage-demo)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction to keep (default 0.5)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def _option_value(text: str, none: bool = False) -> Any:
    """`true`/`false` and numbers become themselves (`default_block_size=8388608`); with
    `none`, `none`/`null` become None."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if none and lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--storage-option {pair!r}: expected KEY=VALUE")
        options[key] = _option_value(value)
    return options


def model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """`--model-arg num_classes=10` pairs as keyword arguments."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--model-arg {pair!r}: expected NAME=VALUE")
        options[key.strip()] = _option_value(value, none=True)
    return options


def gather_options(args: argparse.Namespace) -> dict[str, Any]:
    """Config file first, then every flag that was given."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    given.pop("command", None)
    given.pop("verbose", None)
    pairs = given.pop("storage_option", [])
    config_file = given.pop("config", None)
    options = load_toml(config_file) if config_file else {}
    opts = {**options.pop("storage_options", {}), **storage_options(pairs)}
    arg_pairs = given.pop("model_arg", None)
    if arg_pairs:
        options["model_args"] = {**options.get("model_args", {}), **model_args(arg_pairs)}
    if given.get("inputs") == []:
        given.pop("inputs")
    options.update(given)
    options["storage_options"] = opts
    return options


def _summary(result: api.RunResult | api.EmitResult) -> str:
    emitted = result.emit if isinstance(result, api.RunResult) else result
    t = emitted.totals
    lines = [
        f"seen {t['seen']}  scored {t['scored']}  errored {t['errored']}  "
        f"kept {t['kept']}  dropped {t['dropped']}",
        f"output: {emitted.out}  (shards/, selection.parquet, decisions/, manifest.json, _SUCCESS)",
    ]
    return "\n".join(lines)


def _run_step(command: str, options: dict[str, Any]) -> str:
    dry_run = options.pop("dry_run", False)
    cfg = make_config(**options)
    if command in ("run", "sketch", "score", "emit") and not cfg.inputs:
        raise InputError(
            f"`sage-stream {command}` needs at least one INPUT (or inputs in --config)"
        )
    if dry_run:
        from .dry_run import describe_plan

        return describe_plan(command, cfg)
    if command == "run":
        return _summary(api.run(config=cfg))
    if command == "sketch":
        sk = api.sketch(config=cfg)
        bound = sk.stats["relative_error_bound"]
        return (
            f"sketch: {sk.samples} gradients, D={sk.dim}, ℓ={sk.ell}, C={sk.classes}, "
            f"error bound Δ/‖A‖²_F = {bound:.4f} -> {sk.url}"
        )
    if command == "score":
        sc = api.score(config=cfg)
        return f"scores: seen {sc.seen}, scored {sc.scored}, errored {sc.errored} -> {sc.url}"
    if command == "select":
        sel = api.select(config=cfg)
        return f"selection: kept {sel.kept} of {sel.scored} scored -> {sel.url}"
    return _summary(api.emit(config=cfg))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly as Ctrl-C does."""


_sigterm = threading.Event()  # set by the handler: Ray's blocking calls re-raise a plain Ctrl-C


@contextlib.contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` for the block (main thread only; else a no-op).

    A second SIGTERM while the first unwinds is ignored, so that it cannot cut the lease
    release short; SIGKILL (the orchestrator's next step) still ends the process.
    """

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _sigterm.set()
        raise Terminated

    _sigterm.clear()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals to the embedding program
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    with sigterm_stops_cleanly():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "demo":
            from .demo import run_demo

            print(run_demo(out=args.out, keep=args.keep, device=args.device))
        elif args.command == "report":
            from .report import write_report

            options = storage_options(args.storage_option)
            print(write_report(args.out, storage_options=options, top=args.top))
        elif args.command == "inspect":
            from .summary import describe

            options = storage_options(args.storage_option)
            if args.key is not None:
                from .explain import explain_key
                from .outputs.folder import OutputFolder

                print(explain_key(OutputFolder(args.url, options), args.key))
            else:
                print(describe(args.url, options))
        else:
            print(_run_step(args.command, gather_options(args)))
    except SageError as exc:
        print(f"sage-stream: error: {exc}", file=sys.stderr)
        # with -v, where it came from (user code's own traceback, for a failing factory)
        logging.getLogger("sage_stream").debug("traceback of the error", exc_info=exc)
        return 2
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated) or _sigterm.is_set():
            print("sage-stream: terminated by SIGTERM; the output is left resumable: run the "
                  "same command again", file=sys.stderr)  # fmt: skip
            return 143
        print("sage-stream: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sage-stream inspect OUT | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
