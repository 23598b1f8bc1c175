"""Config: one frozen dataclass, validated once; what the manifest records of it."""

from __future__ import annotations

import pytest

from sage_stream.config import Config, load_toml, make_config, shard_options
from sage_stream.errors import InputError


def test_numbers_take_their_fields_type():
    cfg = make_config(keep=1, ell="16", inputs="a.tar")
    assert cfg.keep == 1.0 and isinstance(cfg.keep, float) and cfg.ell == 16
    assert cfg.inputs == ("a.tar",)
    assert make_config(keep=1) == make_config(keep=1.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nope": 1}, "unknown option"),
        ({"ell": 0}, "--ell must be a positive integer"),
        ({"keep": 1.5}, "--keep must be in"),
        ({"keep": 0.5, "min_score": 0.1}, "not both"),
        ({"grad": "all"}, "--grad 'all': choose one of"),
        ({"params": "x*"}, "--params only applies"),
        ({"batch_size": "many"}, "--batch-size expects a number"),
        ({"min_score": float("nan")}, "finite"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be 0"),
        ({"checkpoint_every": float("nan")}, "--checkpoint-every must be 0"),
    ],
)
def test_bad_options_name_the_flag(options, message):
    with pytest.raises(InputError, match=message):
        make_config(**options)


def test_describe_leaves_out_how_and_secrets():
    cfg = make_config(out="s3://b/o", workers=3, storage_options={"secret": "x", "key": "y"},
                      model=lambda: None)  # fmt: skip
    described = cfg.describe()
    assert "out" not in described and "workers" not in described
    assert described["storage_options"] == ["key", "secret"]  # names only
    assert described["model"].endswith("<lambda>")


def test_reader_options_per_format():
    cfg = Config(max_member_bytes=10, key_column="id")
    assert shard_options(cfg, "tar") == {"max_member_bytes": 10, "max_sample_bytes": 512 * 2**20}
    assert shard_options(cfg, "parquet") == {"key_column": "id"}


def test_toml_uses_the_cli_names(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('label-key = "y"\nell = 32\n[storage_options]\nanon = true\n')
    assert load_toml(str(path)) == {"label_key": "y", "ell": 32, "storage_options": {"anon": True}}
    path.write_text("elll = 3\n")
    with pytest.raises(InputError, match="unknown key"):
        load_toml(str(path))
    with pytest.raises(InputError, match="does not exist"):
        load_toml(str(tmp_path / "none.toml"))
