"""Per-sample gradient features against the slow obvious reference: a loop of autograd.grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sage_stream.errors import InputError
from sage_stream.gradients.featurizer import Features, GradientFeaturizer, find_head
from sage_stream.gradients.projection import projection_matrix


def mlp(head_bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=head_bias))
    return model.double().eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),  # (B, 3, 4, 4)
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),  # (B, 48)
        nn.Linear(48, 5),
    )
    model[1].running_mean.uniform_(-0.5, 0.5)  # non-trivial buffers, used in eval mode
    model[1].running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def batch(shape: tuple[int, ...], classes: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=gen)


def reference(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor):
    """Per-sample gradients by a loop of autograd.grad, one sample at a time: (B, D)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_bias", [True, False])
def test_last_layer_matches_autograd_on_mlp(head_bias):
    model = mlp(head_bias)
    x, y = batch((6,), 4)
    feat = GradientFeaturizer(model)
    out = feat(x, y)
    names = ["2.weight", "2.bias"] if head_bias else ["2.weight"]
    assert feat.head_name == "2" and feat.param_names == names
    assert feat.num_classes == 4 and feat.raw_dim == feat.dim == 4 * (8 + head_bias)
    assert isinstance(out, Features) and out.grads.shape == (7, feat.dim)
    close(out.grads, reference(model, names, x, y))


def test_last_layer_matches_autograd_on_cnn_with_flattened_head_input():
    model = cnn()
    x, y = batch((2, 6, 6), 5)
    out = GradientFeaturizer(model)(x, y)
    close(out.grads, reference(model, ["4.weight", "4.bias"], x, y))


def test_loss_and_logits_match_cross_entropy():
    model = mlp()
    x, y = batch((6,), 4)
    for mode in ("last-layer", "params"):
        out = GradientFeaturizer(model, mode=mode)(x, y)
        with torch.no_grad():
            logits = model(x)
        close(out.logits, logits)
        close(out.loss, F.cross_entropy(logits, y, reduction="none"))


@pytest.mark.parametrize("globs", ["0.*", "*.weight", "2.bias, 0.weight", None])
def test_params_mode_matches_autograd(globs):
    model = cnn() if globs is None else mlp()
    x, y = batch((2, 6, 6), 5) if globs is None else batch((6,), 4)
    feat = GradientFeaturizer(model, mode="params", params=globs)
    expected = {
        "0.*": ["0.weight", "0.bias"],
        "*.weight": ["0.weight", "2.weight"],
        "2.bias, 0.weight": ["0.weight", "2.bias"],  # named_parameters() order, not glob order
        None: [n for n, _ in model.named_parameters()],
    }[globs]
    assert feat.param_names == expected
    assert feat.raw_dim == sum(dict(model.named_parameters())[n].numel() for n in expected)
    close(feat(x, y).grads, reference(model, expected, x, y))


def test_params_mode_of_the_head_equals_last_layer_mode():
    model = cnn()
    x, y = batch((2, 6, 6), 5)
    fast = GradientFeaturizer(model)(x, y).grads
    slow = GradientFeaturizer(model, mode="params", params="4.*")(x, y).grads
    torch.testing.assert_close(fast, slow)


def test_chunk_size_does_not_change_the_result():
    model = mlp()
    x, y = batch((6,), 4, n=10)
    outs = [GradientFeaturizer(model, mode="params", chunk_size=c)(x, y) for c in (1, 3, 64)]
    for out in outs[1:]:
        torch.testing.assert_close(out.grads, outs[0].grads, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.loss, outs[0].loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["last-layer", "params"])
def test_projection_is_applied(mode):
    model = mlp()
    x, y = batch((6,), 4)
    raw = GradientFeaturizer(model, mode=mode)
    proj = GradientFeaturizer(model, mode=mode, project_dim=5, seed=3)
    assert proj.raw_dim == raw.raw_dim and proj.dim == 5
    want = raw(x, y).grads @ projection_matrix(raw.raw_dim, 5, 3)
    torch.testing.assert_close(proj(x, y).grads, want)


@pytest.mark.parametrize("mode", ["last-layer", "params"])
def test_parameters_unchanged_and_no_grad_left(mode):
    model = cnn()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    x, y = batch((2, 6, 6), 5)
    GradientFeaturizer(model, mode=mode)(x, y)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()
    assert not model._forward_hooks and not model[4]._forward_hooks


def test_non_finite_values_pass_through():
    model = mlp()
    x, y = batch((6,), 4)
    x[2, 0] = float("nan")
    for mode in ("last-layer", "params"):
        out = GradientFeaturizer(model, mode=mode)(x, y)
        assert torch.isnan(out.grads[2]).all() and torch.isnan(out.loss[2])
        assert torch.isfinite(out.grads[[0, 1, 3]]).all()


def test_find_head_picks_the_last_linear_or_the_named_one():
    model = mlp()
    name, head = find_head(model)
    assert name == "2" and head is model[2]
    assert find_head(model, "0") == ("0", model[0])
    assert find_head(nn.Linear(3, 2))[0] == ""


@pytest.mark.parametrize(
    ("name", "message"), [("1", "is not an nn.Linear"), ("9", "is not a module")]
)
def test_find_head_errors_name_the_linear_modules(name, message):
    with pytest.raises(InputError, match=message) as info:
        find_head(mlp(), name)
    assert "['0', '2']" in str(info.value)


def test_find_head_without_linear_suggests_params_mode():
    with pytest.raises(InputError, match="--grad params"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))


class AfterHead(nn.Module):
    """A classifier that does something to the head's output before returning it."""

    def __init__(self, after):
        super().__init__()
        self.body, self.head, self.after = nn.Linear(6, 8), nn.Linear(8, 4), after

    def forward(self, x):
        return self.after(self.head(torch.tanh(self.body(x))))


@pytest.mark.parametrize(
    "after",
    [lambda z: 2 * z, lambda z: z.log_softmax(1), lambda z: z.add_(1), lambda z: z[:, :3]],
    ids=["scaled", "log_softmax", "in-place", "sliced"],
)
def test_output_that_is_not_the_head_output_is_refused(after):
    model = AfterHead(after).eval()
    x, y = batch((6,), 3)
    with pytest.raises(InputError, match="--grad params"):
        GradientFeaturizer(model)(x.float(), y)


def test_a_view_of_the_head_output_is_accepted():
    model = AfterHead(lambda z: z.view(len(z), -1)).double().eval()
    x, y = batch((6,), 4)
    out = GradientFeaturizer(model)(x, y)
    close(out.grads, reference(model, ["head.weight", "head.bias"], x, y))


def test_head_input_that_is_not_2d_is_refused():
    model = nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Linear(3, 4)).eval()  # head sees (B, 2, 3)
    with pytest.raises(InputError, match=r"not \(B, H\)"):
        GradientFeaturizer(model)(torch.randn(5, 6), torch.zeros(5, dtype=torch.int64))


def test_params_mode_without_a_linear_learns_classes_from_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 6), nn.Flatten()).double().eval()  # (B, 3) logits
    x, y = batch((2, 6, 6), 3)
    feat = GradientFeaturizer(model, mode="params")
    assert feat.num_classes is None and feat.head_name is None
    close(feat(x, y).grads, reference(model, ["0.weight", "0.bias"], x, y))
    assert feat.num_classes == 3
    with pytest.raises(InputError, match="outside"):
        feat(x, torch.full_like(y, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "full"}, "not one of"),
        ({"mode": "params", "params": "nothing.*"}, "matches no parameter"),
        ({"project_dim": 0}, "positive integer"),
        ({"chunk_size": 0}, "positive integer"),
        ({"head": "1"}, "is not an nn.Linear"),
    ],
)
def test_bad_configuration_raises_input_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        GradientFeaturizer(mlp(), **kwargs)


@pytest.mark.parametrize("mode", ["last-layer", "params"])
def test_bad_labels_raise_input_error(mode):
    feat = GradientFeaturizer(mlp(), mode=mode)
    x, y = batch((6,), 4)
    with pytest.raises(InputError, match="outside"):
        feat(x, torch.full_like(y, 4))
    with pytest.raises(InputError, match="integer"):
        feat(x, y.double())
    with pytest.raises(InputError, match="labels"):
        feat(x, y[:3])


@pytest.mark.parametrize("mode", ["last-layer", "params"])
def test_empty_batch(mode):
    feat = GradientFeaturizer(mlp(), mode=mode)
    out = feat(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    assert out.grads.shape == (0, feat.dim) and out.loss.shape == (0,)
    assert out.logits.shape == (0, 4)


@pytest.mark.parametrize("mode", ["last-layer", "params"])
def test_bf16_forward_keeps_float32_features_close_to_fp32(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    exact = GradientFeaturizer(model, mode=mode)(x, y)
    mixed = GradientFeaturizer(model, mode=mode, precision="bf16")(x, y)
    assert mixed.grads.dtype == mixed.loss.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(exact.grads, mixed.grads, dim=1)
    assert cos.min() > 0.98 and not torch.equal(exact.grads, mixed.grads)
    with pytest.raises(InputError, match="precision 'fp8'"):
        GradientFeaturizer(model, mode=mode, precision="fp8")
