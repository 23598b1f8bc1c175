"""Models as the ecosystem ships them: factory arguments, tuple/dict/ModelOutput outputs,
dict inputs with padded token ids, integer dtypes kept, the params-mode fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import dict_net, tiny_bert

from sage_stream.cli import model_args
from sage_stream.decode.batches import as_input, collate, group_key
from sage_stream.errors import InputError
from sage_stream.gradients.featurizer import GradientFeaturizer
from sage_stream.gradients.model import build_model, load_checkpoint, logits_of


def test_model_args_are_parsed_and_passed_to_the_factory():
    args = model_args(["num_classes=4", "width=2", "scale=0.5", "flag=true", "name=resnet18",
                       "none=none"])  # fmt: skip
    assert args == {"num_classes": 4, "width": 2, "scale": 0.5, "flag": True,
                    "name": "resnet18", "none": None}  # fmt: skip
    model = build_model("zoo:convnet", {"num_classes": 4, "width": 2})
    assert model[-1].out_features == 4 and model[-1].in_features == 2
    with pytest.raises(InputError, match="--model-arg"):
        build_model("zoo:convnet", {"no_such_arg": 1})
    with pytest.raises(InputError, match="NAME=VALUE"):
        model_args(["oops"])


def test_logits_are_found_in_tuples_dicts_and_model_outputs():
    t = torch.zeros(2, 3)
    assert logits_of(t) is t and logits_of((t, "aux")) is t and logits_of({"logits": t}) is t
    assert logits_of({"out": t}, "out") is t and logits_of((None, t), "1") is t
    with pytest.raises(InputError, match="--output-key"):
        logits_of({"out": t, "hidden": t})
    with pytest.raises(InputError, match="not in the model's output"):
        logits_of({"out": t}, "logits_")


def test_last_layer_through_a_dict_output_equals_the_plain_model():
    net = dict_net().eval()
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(InputError, match="--output-key"):
        GradientFeaturizer(net)(x, y)
    got = GradientFeaturizer(net, output_key="out")(x, y)

    class Plain(nn.Module):  # the same weights, returning the logits tensor
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = net.body, net.head

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    ref = GradientFeaturizer(Plain().eval())(x, y)
    assert torch.allclose(got.grads, ref.grads) and torch.allclose(got.loss, ref.loss)


def test_something_after_the_head_is_explained_as_such():
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    with pytest.raises(InputError, match="an operation follows it"):
        GradientFeaturizer(model)(torch.randn(2, 4), torch.tensor([0, 1]))


def test_token_ids_stay_integers_and_are_padded_to_the_longest():
    a = as_input({"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]})
    b = as_input({"input_ids": torch.tensor([8]), "attention_mask": torch.tensor([1])})
    assert a["input_ids"].dtype == torch.int64
    assert group_key(a) == group_key(b)  # lengths differ, one batch
    batch = collate([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert as_input(torch.zeros(2, dtype=torch.uint8)).dtype == torch.float32  # images as before
    assert as_input([1.5, 2.0]).dtype == torch.float32


@pytest.fixture(scope="module")
def bert():
    pytest.importorskip("transformers")
    return tiny_bert().eval()


def bert_batch():
    ids = collate([as_input({"input_ids": torch.tensor(t), "attention_mask": torch.ones(len(t),
                   dtype=torch.int64)}) for t in ([3, 9, 4, 2], [7, 7], [1, 5, 6])])  # fmt: skip
    return ids, torch.tensor([0, 2, 1])


def test_a_transformers_model_in_last_layer_mode(bert):
    x, y = bert_batch()
    f = GradientFeaturizer(bert)
    assert f.head_name == "classifier" and f.num_classes == 3
    feats = f(x, y)
    # the reference: autograd of the head's parameters, one sample at a time
    for i in range(3):
        bert.zero_grad()
        xi = {k: v[i : i + 1] for k, v in x.items()}
        out = bert(**xi).logits
        torch.nn.functional.cross_entropy(out, y[i : i + 1]).backward()
        ref = torch.cat([bert.classifier.weight.grad.flatten(), bert.classifier.bias.grad])
        assert torch.allclose(feats.grads[i], ref, atol=1e-5)


def test_params_mode_on_a_transformers_model(bert):
    x, y = bert_batch()
    f = GradientFeaturizer(bert, mode="params", params="classifier.*,bert.pooler.*")
    feats = f(x, y)
    assert feats.grads.shape == (3, f.raw_dim) and torch.isfinite(feats.grads).all()
    loop = GradientFeaturizer(bert, mode="params", params="classifier.*,bert.pooler.*")
    loop.vmap_ok = False  # the per-sample fallback gives the same gradients
    assert torch.allclose(loop(x, y).grads, feats.grads, atol=1e-5)


def test_params_mode_falls_back_to_a_loop_then_fails_in_one_line():
    class NoVmap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            if float(x.sum()) > 1e9:  # data-dependent control flow: vmap refuses it
                return x
            return self.head(x)

    f = GradientFeaturizer(NoVmap().eval(), mode="params")
    feats = f(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    assert not f.vmap_ok and feats.grads.shape == (3, 10)

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            # through numpy: vmap cannot batch it, autograd finds nothing to differentiate
            return torch.from_numpy(self.head(x).detach().numpy())

    with pytest.raises(InputError, match="--grad params cannot differentiate"):
        GradientFeaturizer(Broken().eval(), mode="params")(torch.randn(2, 4), torch.tensor([0, 1]))


def test_a_checkpoint_that_does_not_fit_names_every_mismatch(tmp_path):
    path = tmp_path / "c.pt"
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5), "extra": torch.zeros(1)}
    torch.save(state, path)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(InputError) as info:
        load_checkpoint(model, str(path))
    text = str(info.value)
    assert "\n" not in text
    for needle in ("2.weight", "extra", "size mismatch for 0.weight"):
        assert needle in text
