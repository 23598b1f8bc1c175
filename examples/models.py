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


def bert_classifier(num_labels: int = 2, vocab_size: int = 30522, layers: int = 2) -> nn.Module:
    """A small transformers BERT sequence classifier from a config (untrained; load weights
    with --checkpoint). It takes `input_ids`/`attention_mask` as --tokenizer gives them and
    returns a ModelOutput whose `logits` come from its final `classifier` Linear."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def vit_classifier(classes: int = 10, image_size: int = 32, channels: int = 3) -> nn.Module:
    """A small transformers ViT image classifier from a config (untrained; load weights with
    --checkpoint): the image job's model with no torchvision, which must match torch's build
    (see the README). It takes the (B, C, H, W) batch the built-in image decoder gives (--crop
    image_size) and returns a ModelOutput whose `logits` come from its final `classifier`."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=classes,
    )
    return ViTForImageClassification(config)
