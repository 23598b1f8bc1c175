"""Image transforms: resize, crop, normalisation and mode, as torchvision does them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from shardmaker import image_bytes

from sage_stream.config import make_config
from sage_stream.decode.decoder import decode_image, make_decoder
from sage_stream.decode.images import ImageTransform, image_transform, parse_normalize
from sage_stream.errors import InputError
from sage_stream.sample import Sample


def gradient_image(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 with a horizontal ramp in red: where the pixels went is visible."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = 100
    return a


def test_no_transform_option_decodes_exactly_as_before():
    data = image_bytes(gradient_image(7, 5))
    assert image_transform(make_config()) is None
    plain = decode_image(data)
    assert torch.equal(plain, decode_image(data, ImageTransform()))
    assert plain.shape == (3, 7, 5) and plain.dtype == torch.float32


def test_resize_keeps_aspect_and_crop_takes_the_centre():
    data = image_bytes(gradient_image(30, 60))
    x = decode_image(data, ImageTransform(resize=20))
    assert x.shape == (3, 20, 40)  # shorter side 20, aspect 1:2 kept
    x = decode_image(data, ImageTransform(resize=20, crop=16))
    assert x.shape == (3, 16, 16)
    ref = np.asarray(Image.fromarray(gradient_image(30, 60)).resize((40, 20), Image.BILINEAR))
    expected = torch.from_numpy(ref[2:18, 12:28].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, expected)


def test_a_crop_larger_than_the_image_pads_with_zeros():
    x = decode_image(image_bytes(gradient_image(4, 4)), ImageTransform(crop=8))
    assert x.shape == (3, 8, 8)
    assert float(x[:, 0].abs().sum()) == 0 and float(x[:, 2:6, 2:6].sum()) > 0


def test_normalize_presets_and_explicit_values():
    mean, std = parse_normalize("imagenet")
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    assert parse_normalize("none") is None and parse_normalize(None) is None
    assert parse_normalize("0.5,0.25") == ((0.5,), (0.25,))
    data = image_bytes(gradient_image(6, 6))
    raw = decode_image(data)
    x = decode_image(data, image_transform(make_config(normalize="imagenet")))
    expected = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(x, expected)
    x = decode_image(data, image_transform(make_config(normalize="0.5,0.25")))
    assert torch.allclose(x, (raw - 0.5) / 0.25)


def test_image_mode_converts_grey_and_colour():
    grey = image_bytes(np.full((5, 5), 128, dtype=np.uint8))
    assert decode_image(grey).shape == (1, 5, 5)
    assert decode_image(grey, ImageTransform(mode="RGB")).shape == (3, 5, 5)
    colour = image_bytes(gradient_image(5, 5))
    assert decode_image(colour, ImageTransform(mode="L")).shape == (1, 5, 5)
    # ImageNet statistics are three channels: a grey image becomes RGB for them
    assert decode_image(grey, image_transform(make_config(normalize="imagenet"))).shape[0] == 3


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"resize": 0}, "--resize"),
        ({"crop": -3}, "--crop"),
        ({"normalize": "imagenett"}, "--normalize"),
        ({"normalize": "0.5,0.5,0.5"}, "--normalize"),
        ({"normalize": "0.5,0"}, "std"),
        ({"image_mode": "CMYK"}, "--image-mode"),
        ({"image_mode": "L", "normalize": "imagenet"}, "channels"),
        ({"resize": "big"}, "--resize"),
    ],
)
def test_bad_transform_options_are_one_line_errors(options, needle):
    with pytest.raises(InputError, match=needle):
        make_config(**options)


def test_the_decoder_applies_the_transform_to_image_members_only():
    decoder = make_decoder(label_key="cls", transform=ImageTransform(resize=8, crop=8))
    sample = Sample("k", "s.tar", {"jpg": image_bytes(gradient_image(20, 12), "JPEG"),
                                    "cls": b"1"})  # fmt: skip
    x, y = decoder(sample)
    assert x.shape == (3, 8, 8) and y == 1


def test_transform_options_are_recorded_only_when_set():
    assert "resize" not in make_config().describe()
    described = make_config(resize=32, crop=28, normalize="imagenet").describe()
    assert described["resize"] == 32 and described["normalize"] == "imagenet"
