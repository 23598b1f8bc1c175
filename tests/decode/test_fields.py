"""Fields: nested keys, Hugging Face image structs, binary image columns, tensor columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from shardmaker import image_bytes, make_parquet_shard, npy_bytes

from sage_stream.config import make_config
from sage_stream.decode import fields
from sage_stream.decode.decoder import make_decoder
from sage_stream.errors import InputError, SampleError
from sage_stream.formats import read_shard
from sage_stream.inputs import expand_inputs
from sage_stream.sample import Sample

RED = np.zeros((4, 6, 3), dtype=np.uint8) + np.array([200, 10, 10], dtype=np.uint8)


def sample(**values) -> Sample:
    return Sample("k", "s.parquet", dict(values))


def test_lookup_exact_lowercase_and_nested():
    f = {"seg.png": b"a", "png": b"b", "image": {"bytes": b"c", "meta": {"w": 3}}}
    assert fields.lookup(f, "seg.png") == b"a"  # a tar field with a dot is itself
    assert fields.lookup(f, "PNG") == b"b"
    assert fields.lookup(f, "image.bytes") == b"c"
    assert fields.lookup(f, "image.meta.w") == 3
    assert fields.lookup(f, "image.nothing") is None and fields.lookup(f, "png.x") is None
    assert fields.lookup({"a.b": {"c": 1}}, "a.b.c") == 1  # a column whose name has a dot
    assert fields.names(f) == ["image.bytes", "image.meta.w", "png", "seg.png"]


def test_a_hugging_face_image_struct_is_the_input_by_default():
    decoder = make_decoder(label_key="label")
    x, y = decoder(sample(image={"bytes": image_bytes(RED), "path": None}, label=2))
    assert x.shape == (3, 4, 6) and y == 2
    assert float(x[0].mean()) > 0.7  # red
    # and by name, whole or its bytes member
    for key in ("image", "image.bytes"):
        x2, _ = make_decoder(input_key=key, label_key="label")(
            sample(image={"bytes": image_bytes(RED), "path": "a.png"}, label=0)
        )
        assert torch.equal(x, x2)


def test_a_struct_with_only_a_path_is_a_clear_sample_error():
    decoder = make_decoder(input_key="image", label_key="label")
    with pytest.raises(SampleError, match="holds no bytes"):
        decoder(sample(image={"bytes": None, "path": "/data/a.png"}, label=0))


def test_another_struct_asks_for_a_member():
    decoder = make_decoder(input_key="obj", label_key="label")
    with pytest.raises(SampleError, match="--input-key obj.a"):
        decoder(sample(obj={"a": [1.0], "b": 2}, label=0))


def test_binary_image_and_npy_columns_are_found_by_their_bytes():
    decoder = make_decoder(label_key="label")
    x, _ = decoder(sample(picture=image_bytes(RED, "WEBP"), label=1, note=b"not an image"))
    assert x.shape == (3, 4, 6)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    x, _ = decoder(sample(blob=npy_bytes(arr), label=1))
    assert torch.equal(x, torch.from_numpy(arr))


def test_the_old_rule_wins_so_earlier_jobs_stay_unambiguous():
    # a list column next to an image column: the list column, as before this module existed
    decoder = make_decoder(label_key="label")
    x, _ = decoder(sample(features=[1.0, 2.0], thumb=image_bytes(RED), label=0))
    assert x.tolist() == [1.0, 2.0]


def test_a_missing_label_suggests_the_column_that_is_there():
    decoder = make_decoder(label_key="cls")
    with pytest.raises(SampleError, match="pass --label-key label"):
        decoder(sample(features=[1.0], label=0))


def test_label_key_none_means_unlabeled():
    assert make_config(label_key="none").label_key is None
    assert make_config(label_key="None").label_key is None
    with pytest.raises(InputError, match="--label-key"):
        make_config(label_key=False)
    _, y = make_decoder(label_key=None)(sample(features=[1.0]))
    assert y == 0


def test_parquet_tensor_and_nested_list_columns_keep_their_shape(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    table = pa.table({
        "t": pa.FixedShapeTensorArray.from_numpy_ndarray(arr),
        "nested": [a.tolist() for a in arr],
        "label": [0, 1, 2, 0],
    })  # fmt: skip
    url = make_parquet_shard(tmp_path / "t.parquet", table)
    rows = list(read_shard(expand_inputs([url])[0]))
    for key in ("t", "nested"):
        x, y = make_decoder(input_key=key, label_key="label")(rows[1])
        assert x.shape == (2, 3) and torch.equal(x, torch.from_numpy(arr[1])) and y == 1
