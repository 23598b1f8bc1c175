"""Options defined once (Config's field metadata): the API's explicit keyword signatures and
the CLI's per-command flags are checked against it, and an explicit keyword always beats
`config=` (issue 23: `run(config=Config(ell=16), ell=256)` ran with ell=16, an explicit value
equal to the default being taken for "not given")."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sage_stream import api
from sage_stream.cli import build_parser, main
from sage_stream.config import Config

STEPS = ("run", "sketch", "score", "select", "emit")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# The API's default None stands for Config's empty value for these (documented in api.py).
EMPTY_WHEN_NONE = {"inputs": (), "out": "", "model_args": {}, "storage_options": {}}


@pytest.mark.parametrize("step", STEPS)
def test_each_step_takes_exactly_its_options_with_configs_defaults(step):
    params = dict(inspect.signature(getattr(api, step)).parameters)
    assert params.pop("config").default is None
    used = {name for name, f in FIELDS.items() if step in f.metadata["steps"]}
    assert set(params) == used
    for name, p in params.items():
        default = getattr(Config(), name)
        expected = None if name in EMPTY_WHEN_NONE else default
        assert p.default == expected, name
        assert p.kind is (p.POSITIONAL_OR_KEYWORD if name == "inputs" else p.KEYWORD_ONLY)


def test_every_option_says_what_it_is():
    for name, f in FIELDS.items():
        assert f.metadata["help"] and f.metadata["group"] and f.metadata["steps"], name
        assert set(f.metadata["steps"]) <= set(STEPS), name


def _flags(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    listed, accepted = set(), set()
    for action in sub._actions:
        for flag in action.option_strings or [action.dest]:
            accepted.add(flag)
            if action.help != "==SUPPRESS==":
                listed.add(flag)
    return listed, accepted


@pytest.mark.parametrize("step", STEPS)
def test_each_command_lists_only_the_options_its_step_uses(step):
    listed, accepted = _flags(build_parser(), step)
    for name, f in FIELDS.items():
        flag = "inputs" if name == "inputs" else f.metadata["flag"] or "--" + name.replace("_", "-")
        assert (flag in listed) == (step in f.metadata["steps"]), (step, flag)
        if flag in listed:
            assert flag in accepted
    assert {"--config", "-v", "-h"} <= listed


def test_flags_a_step_does_not_use_are_still_accepted_where_they_always_were(capsys):
    # `select` never used --input-key or --no-progress, but scripts pass them to every step.
    _, accepted = _flags(build_parser(), "select")
    assert {"--input-key", "--no-progress", "--overwrite", "--batch-size"} <= accepted
    assert "--device" not in accepted  # never accepted by select: still refused
    with pytest.raises(SystemExit):
        main(["select", "--out", "x", "--keep", "0.3", "--device", "cpu"])
    assert "unrecognized arguments: --device" in capsys.readouterr().err


def test_an_explicit_keyword_beats_config(monkeypatch):
    seen = []
    monkeypatch.setattr(api, "_run", seen.append)
    monkeypatch.setattr(api, "_pass", lambda cfg, name, step: seen.append(cfg))
    api.run(config=Config(ell=16, out="o", keep=0.5), ell=256)
    api.run(config=Config(ell=16, out="o", keep=0.5), keep=0.5, seed=3)
    api.sketch("a.tar", config=Config(out="o", label_key="y", grad="params"), label_key="cls",
               grad="last-layer")  # fmt: skip
    api.run(["a.tar"], out="o", keep=0.5, model_args=None, storage_options=None)
    assert seen[0].ell == 256 and seen[0].keep == 0.5
    assert seen[1].ell == 16 and seen[1].seed == 3
    assert seen[2].label_key == "cls" and seen[2].grad == "last-layer"
    assert seen[2].inputs == ("a.tar",)
    assert seen[3].model_args == {} and seen[3].storage_options == {}


def test_the_signatures_stay_explicit_for_help():
    params = api.run.__wrapped__.__code__.co_varnames  # the written-out keywords, not **kwargs
    assert "ell" in params and "keep" in params
    assert "ell" in str(inspect.signature(api.run))


def test_byte_sizes_take_units_from_every_source():
    assert Config(max_member_bytes="1GiB").max_member_bytes == 2**30
    args = build_parser().parse_args(["emit", "--max-sample-bytes", "2MB", "--out", "o"])
    assert args.max_sample_bytes == "2MB"  # parsed once, by Config (units.byte_size)
    with pytest.raises(ValueError, match="--max-member-bytes expects a size"):
        Config(max_member_bytes="lots")


def test_cli_only_flags_stay_where_they_were():
    parser = build_parser()
    for step in STEPS:
        listed, _ = _flags(parser, step)
        assert "--dry-run" in listed, step
    assert parser.parse_args(["inspect", "o", "--key", "k"]).key == "k"
