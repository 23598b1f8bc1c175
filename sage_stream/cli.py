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
import dataclasses
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .config import (
    DECODING,
    IMAGES,
    INPUT,
    MODEL,
    RUN,
    SELECTION,
    TEXT,
    Config,
    load_toml,
    make_config,
)  # fmt: skip
from .errors import (
    SIGTERM_RECEIVED,
    InputError,
    SageError,
    Terminated,
    stopped_by_sigterm,
)

if TYPE_CHECKING:
    from .passes.emit import EmitResult

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


# The groups of the step commands' help, in order. Options of the first two and of `run` were
# accepted by every step command from the start: a step that does not use one still accepts it
# (scripts pass them to every step) but does not list it.
GROUPS = (INPUT, IMAGES, TEXT, DECODING, MODEL, SELECTION, RUN)
ACCEPTED_BY_EVERY_STEP = (INPUT, IMAGES, TEXT, DECODING, RUN)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _add_option(group: Any, f: dataclasses.Field, listed: bool) -> None:
    """One Config field as a flag, from its metadata (or a positional, for `inputs`)."""
    meta = f.metadata
    shown = meta["help"] if listed else argparse.SUPPRESS
    if f.name == "inputs":
        group.add_argument("inputs", nargs="*", metavar=meta["metavar"], help=shown)
        return
    extra: dict[str, Any] = {"dest": f.name, "help": shown}
    if f.type in ("bool", "bool | None"):
        off = _flag(f).startswith("--no-")
        extra.update(action="store_false" if off else "store_true", default=None)
    elif f.default_factory is dict:  # K=V pairs, repeatable
        extra.update(action="append", metavar=meta["metavar"])
    else:
        extra.update(metavar=meta["metavar"], choices=meta["choices"])
        if meta["kind"] is not None:
            extra["type"] = meta["kind"]
    group.add_argument(_flag(f), **extra)


def _add_step_options(p: argparse.ArgumentParser, command: str) -> None:
    """The options of one step command, from `Config`'s fields: listed where the step uses
    them (their `steps`), accepted unlisted where every step always accepted them."""
    fields = dataclasses.fields(Config)
    for title in GROUPS:
        members = [f for f in fields if f.metadata["group"] == title]
        used = [f for f in members if command in f.metadata["steps"]]
        accepted = members if title in ACCEPTED_BY_EVERY_STEP else used
        if not accepted:
            continue
        group = p.add_argument_group(title) if used else p
        if title == RUN:
            group.add_argument("--config", metavar="FILE.toml",
                               help="options from a TOML file; flags win")  # fmt: skip
        for f in accepted:
            _add_option(group, f, f in used)
        if title == RUN:
            group.add_argument("--dry-run", action="store_true", default=None,
                               help="print the plan (inputs and their pinned sizes, what OUT "
                               "holds, the steps that would run or be skipped) and write "
                               "nothing")  # fmt: skip
            group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-stream",
        description=DESCRIPTION,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    steps = {
        "run": "all steps: sketch, score, select, emit",
        "sketch": "pass 1: per-sample gradients -> FD sketch (OUT/sketch.zarr)",
        "score": "pass 2: a score for every sample (OUT/scores/)",
        "select": "choose the kept samples (OUT/selection.parquet, decisions.parquet)",
        "emit": "write kept samples to OUT/shards/, manifest, _SUCCESS",
    }
    for name, text in steps.items():
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False)
        _add_step_options(p, name)
    p = sub.add_parser(
        "inspect", allow_abbrev=False, help="summary of a sketch, a scores table or a run's output"
    )
    p.add_argument("url", help="OUT, OUT/sketch.zarr, OUT/scores, or a scores part")
    p.add_argument(
        "--key",
        metavar="KEY",
        help="with OUT: that sample's scores row, whether it was kept and why, its class's cut",
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
    pairs = given.pop("storage_options", None) or []
    config_file = given.pop("config", None)
    options = load_toml(config_file) if config_file else {}
    opts = {**options.pop("storage_options", {}), **storage_options(pairs)}
    arg_pairs = given.pop("model_args", None)
    if arg_pairs:
        options["model_args"] = {**options.get("model_args", {}), **model_args(arg_pairs)}
    if given.get("inputs") == []:
        given.pop("inputs")
    options.update(given)
    options["storage_options"] = opts
    return options


def _summary(emitted: EmitResult) -> str:
    t = emitted.totals
    lines = [
        f"seen {t['seen']}  scored {t['scored']}  errored {t['errored']}  "
        f"kept {t['kept']}  dropped {t['dropped']}",
        f"output: {emitted.out}  (shards/, selection.parquet, decisions.parquet, manifest.json, _SUCCESS)",
    ]
    return "\n".join(lines)


def _run_step(command: str, options: dict[str, Any]) -> str:
    from . import api  # torch and the passes load here, not for --help or inspect

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
        return _summary(api.run(config=cfg).emit)
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


@contextlib.contextmanager
def sigterm_stops_cleanly() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` for the block (main thread only; else a no-op).

    A second SIGTERM while the first unwinds is ignored, so that it cannot cut the lease
    release short; SIGKILL (the orchestrator's next step) still ends the process.
    """

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        SIGTERM_RECEIVED.set()
        raise Terminated

    SIGTERM_RECEIVED.clear()

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
            from .summary import summarize

            options = storage_options(args.storage_option)
            if args.key is not None:
                from .explain import explain_key
                from .outputs.folder import OutputFolder

                print(explain_key(OutputFolder(args.url, options), args.key))
            else:
                print(summarize(args.url, options))
        else:
            print(_run_step(args.command, gather_options(args)))
    except SageError as exc:
        print(f"sage-stream: error: {exc}", file=sys.stderr)
        # with -v, where it came from (user code's own traceback, for a failing factory)
        logging.getLogger("sage_stream").debug("traceback of the error", exc_info=exc)
        return 2
    except KeyboardInterrupt as exc:
        if stopped_by_sigterm(exc):
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
