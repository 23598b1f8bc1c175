"""The API's options: an explicit keyword always beats `config=` (issue 23: `run(config=
Config(ell=16), ell=256)` ran with ell=16, an explicit value equal to the default being taken
for "not given")."""

from __future__ import annotations

from sage_stream import api
from sage_stream.config import Config


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
    assert "ell" in str(__import__("inspect").signature(api.run))
