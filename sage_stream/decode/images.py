"""Image transforms: what a torchvision or timm model expects, as options instead of code.

Where it sits: read → **decode** (image bytes → PIL → this → tensor) → batch → model. The
built-in image decoder applies one `ImageTransform` to every image member it decodes:

    mode     RGB | L: convert first (default: L stays L, everything else becomes RGB)
    resize   N: the shorter side becomes N, the aspect ratio is kept (torchvision Resize(N))
    crop     N: the centre N×N (torchvision CenterCrop(N); a smaller image is padded with 0)
    tensor   float32 (C, H, W) in [0, 1]
    normalize (x - mean) / std per channel: `imagenet`, `none`, or `MEAN,STD` (one value each,
             for every channel) or `M1,M2,M3,S1,S2,S3` (per channel)

With none of them given, decoding is exactly what it was before these options existed (so
earlier runs keep their results). Mixed-size images batch normally after `crop`; without it,
`batches` groups samples by shape so that differing sizes do not cut every batch short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and Pillow load with the first image, not with the options
    import torch
    from PIL import Image

from ..errors import InputError

IMAGE_MODES = ("RGB", "L")
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The options (Config field names) that make up an ImageTransform; the run identity holds them.
TRANSFORM_FIELDS = ("resize", "crop", "normalize", "image_mode")


@dataclass(frozen=True)
class ImageTransform:
    """PIL image → normalised float tensor (C, H, W); see the module docstring. Picklable."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mode: str | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        mode = self.mode or ("L" if image.mode == "L" else "RGB")
        if image.mode != mode:
            image = image.convert(mode)
        if self.resize is not None:
            image = _resize_shorter(image, self.resize)
        if self.crop is not None:
            image = _center_crop(image, self.crop)
        array = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
        x = torch.from_numpy(array.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = x.contiguous().float().div_(255.0)  # (C, H, W) in [0, 1]
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean).view(-1, 1, 1)
            std = torch.tensor(self.std).view(-1, 1, 1)
            if mean.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"--normalize has {mean.shape[0]} channels, the image has {x.shape[0]}"
                )
            x = (x - mean) / std
        return x


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    new = (size, max(1, int(size * h / w))) if w <= h else (max(1, int(size * w / h)), size)
    from PIL import Image

    return image.resize(new, Image.Resampling.BILINEAR)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))  # outside the image: zeros


def parse_normalize(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """`imagenet` | `none` | `MEAN,STD` | `M1,..,Mc,S1,..,Sc` → (mean, std) or None."""
    if text is None or text.strip().lower() == "none":
        return None
    name = text.strip().lower()
    if name in PRESETS:
        return PRESETS[name]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or len(values) % 2:
        raise InputError(
            f"--normalize {text!r}: give imagenet, none, MEAN,STD or M1,M2,M3,S1,S2,S3"
        )
    half = len(values) // 2
    mean, std = values[:half], values[half:]
    if any(s <= 0 for s in std):
        raise InputError(f"--normalize {text!r}: every std must be positive")
    return mean, std


def check_options(
    resize: int | None, crop: int | None, normalize: str | None, image_mode: str | None
) -> None:
    """Refuse bad transform options at the edge, with the flag's name."""
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and value < 1:
            raise InputError(f"--{name} must be a positive number of pixels, got {value}")
    if image_mode is not None and image_mode not in IMAGE_MODES:
        raise InputError(f"--image-mode {image_mode!r}: choose one of {', '.join(IMAGE_MODES)}")
    stats = parse_normalize(normalize)
    if stats is not None and image_mode is not None:
        channels = 3 if image_mode == "RGB" else 1
        if len(stats[0]) not in (1, channels):
            raise InputError(
                f"--normalize {normalize!r} has {len(stats[0])} channels but --image-mode "
                f"{image_mode} gives {channels}"
            )


def image_transform(options: Any) -> ImageTransform | None:
    """The transform of a Config (or of a manifest's recorded config, a dict); None when no
    transform option is set, so that decoding stays exactly the default."""

    def get(name: str) -> Any:
        return options.get(name) if isinstance(options, dict) else getattr(options, name, None)

    resize, crop, normalize, mode = (get(n) for n in TRANSFORM_FIELDS)
    stats = parse_normalize(normalize)
    if resize is None and crop is None and stats is None and mode is None:
        return None
    if stats is not None and mode is None:  # three channel statistics mean an RGB image
        mode = "RGB" if len(stats[0]) == 3 else None
    mean, std = stats if stats is not None else (None, None)
    return ImageTransform(resize=resize, crop=crop, mean=mean, std=std, mode=mode)
