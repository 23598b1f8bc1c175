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


def tiny_bert(num_labels: int = 3, vocab_size: int = 64, hidden: int = 16) -> nn.Module:
    """A transformers BertForSequenceClassification built from a config: no download."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def token_inputs(sample):
    """Preprocess: a Parquet row with token ids `ids` (any length) and `label` -> a dict of
    model inputs, as a tokenizer would give them."""
    ids = torch.tensor(sample.fields["ids"], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, sample.fields["label"]


class DictNet(nn.Module):
    """Returns a dict: logits under `out` and a hidden state, as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"hidden": h, "out": self.head(h)}


def dict_net() -> nn.Module:
    return DictNet()


def collapsed(dim: int = 8, classes: int = 3) -> nn.Module:
    """An MLP whose hidden layer ignores its input (tiny weights, a large bias): every sample
    of a class gets the same gradient, as with a badly initialised proxy: flat scores."""
    torch.manual_seed(0)
    first = nn.Linear(dim, 16)
    with torch.no_grad():
        first.weight.mul_(1e-6)
        first.bias.fill_(1.0)
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, classes))
