"""The proxy model: factories, safe checkpoints, fingerprints, devices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sage_stream.errors import InputError
from sage_stream.gradients.model import build_model, fingerprint, load_model, resolve_device


def factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def test_factory_forms_and_a_non_module_is_refused():
    assert isinstance(build_model(factory), nn.Module)
    module = factory()
    assert build_model(module) is module
    with pytest.raises(InputError, match="not nn.Module"):
        build_model(lambda: "a string")


def test_fingerprint_follows_the_weights():
    a, b = factory(), factory()
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b[0].bias[0] += 1
    assert fingerprint(a) != fingerprint(b)


def test_checkpoint_is_loaded_nested_or_flat(tmp_path):
    trained = factory()
    with torch.no_grad():
        trained[0].weight.fill_(0.5)
    for name, state in (
        ("flat", trained.state_dict()),
        ("nested", {"state_dict": trained.state_dict()}),
    ):
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        model, digest = load_model(factory, str(path), torch.device("cpu"))
        assert digest == fingerprint(trained) and not model.training


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(factory, str(tmp_path / "none.pt"), torch.device("cpu"))
    wrong = tmp_path / "wrong.pt"
    torch.save(nn.Linear(5, 2).state_dict(), wrong)
    with pytest.raises(InputError, match="does not fit the model"):
        load_model(factory, str(wrong), torch.device("cpu"))


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="--device"):
        resolve_device("tpu:x")
