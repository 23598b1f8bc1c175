"""Model factories for `--model examples.models:NAME` (run from the repository root).

A factory takes no arguments and returns an `nn.Module` whose output is the logits of a final
`nn.Linear` (the head that `--grad last-layer` differentiates in closed form).
"""

from torch import nn


def tabular_mlp(features: int = 16, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes))


def small_cnn(channels: int = 3, classes: int = 10) -> nn.Module:
    """A small CNN for 32×32 images (`png`/`jpg` members decode to float CHW in [0, 1])."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def tiny_cnn(channels: int = 3, classes: int = 10) -> nn.Module:
    """A CNN so small that decoding its JPEG input costs more than its forward pass (the
    decode-bound case of benchmarks/loader.py): one strided convolution, then the head."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 5, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
