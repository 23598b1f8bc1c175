"""The accelerator case of benchmarks/gpu.py (library): a ResNet-18-sized CNN, and `measure`,
which cases.py runs in the child: forward-only, pass 1 and pass 2 (fp32 and bf16), params mode
with a projection, the model alone, and FD update rates.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch
from sage_cases import Phases, _forward, case_fd
from torch import nn

import sage_stream

CLASSES = 100


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool): 11.2M parameters at width 64."""

    def __init__(self, classes: int = CLASSES, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        widths, cin, layers = [width, 2 * width, 4 * width, 8 * width], width, []
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, classes)  # the head: D = C·(8·width + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 3, 32, 32)
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(h.mean(dim=(2, 3)))  # (B, C)


def resnet(width: int) -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(CLASSES, width).eval()


def _model_only(model: nn.Module, batch: int, device: str, seconds: float) -> float:
    """samples/s of model(x) on a batch already on the device (no reader), for `seconds`."""
    x = torch.rand(batch, 3, 32, 32, device=device)
    done, start = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds or done == 0:
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            done += batch
    return done / (time.perf_counter() - start)


def measure(p: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child (cases.py `gpu`): every figure of the benchmark, on p["device"]."""
    shutil.rmtree(p["out"], ignore_errors=True)  # a finished sketch there would be resumed
    device, model = p["device"], resnet(p["width"]).to(p["device"])
    # loader_workers=0: the same in-process reader as the forward-only pass (benchmarks/loader.py
    # measures the loader's workers)
    opts = dict(model=model, ell=p["ell"], batch_size=p["batch"], device=device, progress=False,
                loader_workers=0)  # fmt: skip
    phase = Phases(device)
    _forward({"shards": p["shards"][:1]}, {**opts, "out": p["out"] + "/warm"})  # warm-up
    with phase("forward"):
        _forward({"shards": p["shards"]}, {**opts, "out": p["out"] + "/fwd"})
    with phase("sketch"):
        stats = sage_stream.sketch(p["shards"], out=p["out"] + "/ll", **opts).stats
    with phase("score"):
        sage_stream.score(p["shards"], out=p["out"] + "/ll", **opts)
    with phase("sketch_bf16"):
        sage_stream.sketch(p["shards"], out=p["out"] + "/bf16", precision="bf16", **opts)
    with phase("score_bf16"):
        sage_stream.score(p["shards"], out=p["out"] + "/bf16", precision="bf16", **opts)
    params = dict(grad="params", params=p["params"], project_dim=p["project_dim"])
    few = p["shards"][: p["params_shards"]]
    with phase("sketch_params_projected"):
        sage_stream.sketch(few, out=p["out"] + "/params", **opts, **params)
    model_only = _model_only(model, p["batch"], device, p["model_only_s"])
    fd = case_fd({"grid": p["grid"], "shrinks": p["shrinks"], "device": device})["fd"]
    return {**phase.summary(), "sketch_stats": stats, "model_only": model_only, "fd": fd}
