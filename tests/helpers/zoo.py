"""Models for the real-job tests, built locally (no downloads): `--model zoo:convnet`.

`convnet` takes images of any size (global average pooling before the head), like the
torchvision and timm classifiers it stands in for; its arguments come from `--model-arg`.
"""

from __future__ import annotations

import torch
from torch import nn


def convnet(num_classes: int = 3, channels: int = 3, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
