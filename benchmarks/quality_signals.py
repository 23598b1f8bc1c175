"""The quality benchmark's second data set: Synthetic Control Chart time series, and a 1-D CNN.

The data comes from the published generator of the UCI "Synthetic Control Chart Time Series"
set (Alcock & Manolopoulos 1999, after Pham & Chan 1998), run here with a fixed seed, so
nothing is downloaded. Six classes of series of length 60, t = 1..60, with m = 30 and
r ~ U(−3, 3) drawn per point:

    0 normal            y(t) = m + r·s
    1 cyclic            y(t) = m + r·s + a·sin(2πt/T),   a ~ U(10, 15), T ~ U(10, 15)
    2 increasing trend  y(t) = m + r·s + g·t,            g ~ U(0.2, 0.5)
    3 decreasing trend  y(t) = m + r·s − g·t
    4 upward shift      y(t) = m + r·s + k·x,            x ~ U(7.5, 20), k = [t ≥ t₃],
    5 downward shift    y(t) = m + r·s − k·x             t₃ ~ U(n/3, 2n/3)

One change to the published parameters: the noise scale is s = 5, not 2. With s = 2 the CNN
below reaches 98% test accuracy from 60 training series (10 per class) and 99.5% from 1,800,
so no subset could be told from another; with s = 5 it reaches 0.77 from 60, 0.81 from 120,
0.92 from 360 and 0.95 from 1,800 (measured once while choosing, 2 seeds).

Each series is stored standardised ((y − 30)/10, float32), so the model sees values near
[−3, 3]. The model is a small 1-D CNN whose head is a linear layer on a 32-wide hidden layer
(the stage's last-layer gradients are of that head); it is trained as the digits' MLP is
(full-batch Adam, lr 1e-2, 300 steps), and the proxy in float64 from numpy starting weights,
so that the proxy and its scores do not depend on the machine's CPU kernels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from sage_stream.demo import fit_full_batch  # the demo's proxy training, shared

LENGTH, CLASSES = 60, 6
MEAN, SPREAD = 30.0, 5.0  # SPREAD: s, see the module docstring


def control_charts(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` series of each class, shuffled: x (6·per_class, 60) float32, y int64."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, LENGTH + 1, dtype=np.float64)  # (60,)
    n = per_class * CLASSES
    y = np.repeat(np.arange(CLASSES), per_class)
    x = MEAN + rng.uniform(-3.0, 3.0, size=(n, LENGTH)) * SPREAD  # (n, 60)
    a, period = rng.uniform(10, 15, n), rng.uniform(10, 15, n)
    slope, shift = rng.uniform(0.2, 0.5, n), rng.uniform(7.5, 20, n)
    start = rng.uniform(LENGTH / 3, 2 * LENGTH / 3, n)
    for i, c in enumerate(y.tolist()):
        if c == 1:
            x[i] += a[i] * np.sin(2 * math.pi * t / period[i])
        elif c in (2, 3):
            x[i] += (1 if c == 2 else -1) * slope[i] * t
        elif c in (4, 5):
            x[i] += (1 if c == 4 else -1) * shift[i] * (t >= start[i])
    order = rng.permutation(n)
    return ((x[order] - MEAN) / 10.0).astype(np.float32), y[order].astype(np.int64)


def control_cnn() -> nn.Module:
    """(B, 60) series -> 6 logits: two conv blocks, a 32-wide hidden layer, a linear head."""
    return nn.Sequential(
        nn.Unflatten(1, (1, LENGTH)),
        nn.Conv1d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 16, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(6),
        nn.Flatten(),
        nn.Linear(96, 32),
        nn.ReLU(),
        nn.Linear(32, CLASSES),
    )


def train(x: np.ndarray, y: np.ndarray, *, steps: int = 300, seed: int = 0) -> nn.Module:
    """Full-batch Adam on (x, y) in float32, from torch's seeded initial weights."""
    torch.manual_seed(seed)
    return fit_full_batch(control_cnn(), x, y, steps)


def train_reproducible(
    x: np.ndarray, y: np.ndarray, *, steps: int = 300, seed: int = 0
) -> nn.Module:
    """`train` with the same result on every machine: numpy starting weights (torch's default
    ranges, U(±1/sqrt(fan_in))) and float64 steps, as `sage_stream.demo.train_reproducible`."""
    rng = np.random.default_rng(seed)
    model = control_cnn().double()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d)):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                for param in (layer.weight, layer.bias):
                    param.copy_(torch.from_numpy(rng.uniform(-bound, bound, param.shape)))
    return fit_full_batch(model, x, y, steps)
