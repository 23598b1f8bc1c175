"""Text: a tokenizer as the decoder, so that a text classifier scores a `text` column with no
code.

Where it sits: read → **decode** (text → token ids) → batch (a dict, ids padded) → model.
`--tokenizer PATH` is a local Hugging Face tokenizer folder (`save_pretrained`; read with
`tokenizers` when it holds a `tokenizer.json`, else with `transformers.AutoTokenizer`, files
only) or a `tokenizers` `.json` file. Each sample's text (field `--input-key`, default `text`;
a tar member's bytes are read as UTF-8) becomes `{"input_ids", "attention_mask"}`, truncated to
`--max-length` tokens (default 512) with the tokenizer's own special tokens. In a batch, ids
are padded with 0 to the longest and the attention mask is 0 there, so a model that honours
the mask (every transformers encoder) gives the same logits as unpadded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError, SampleError
from ..sample import Sample
from . import fields

DEFAULT_MAX_LENGTH = 512
Encode = Callable[[str], tuple[list[int], list[int]]]  # text -> (ids, attention mask)


def load_tokenizer(path: str, max_length: int) -> Encode:
    """An encode function from a tokenizer folder or `.json` file; InputError if it cannot."""
    if os.path.isfile(path):
        return _from_json(path, max_length)
    if not os.path.isdir(path):
        raise InputError(f"--tokenizer {path}: no such file or folder (give a local path)")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _from_json(os.path.join(path, "tokenizer.json"), max_length)
    return _from_transformers(path, max_length)


def _from_json(path: str, max_length: int) -> Encode:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError(
            "--tokenizer needs the tokenizers package: pip install 'sage-stream[text]'"
        ) from None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # noqa: BLE001 - the Rust side raises its own exception type
        raise InputError(f"--tokenizer {path}: not a tokenizers file: {exc}") from None
    tok.no_padding()  # batches pad; a padding set in the file would fix every length
    tok.enable_truncation(max_length)

    def encode(text: str) -> tuple[list[int], list[int]]:
        out = tok.encode(text)
        return out.ids, out.attention_mask

    return encode


def _from_transformers(path: str, max_length: int) -> Encode:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError(
            f"--tokenizer {path}: a folder without tokenizer.json needs transformers: "
            "pip install 'sage-stream[hf]'"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise InputError(f"--tokenizer {path}: not a tokenizer folder: {exc}") from None

    def encode(text: str) -> tuple[list[int], list[int]]:
        out = tok(text, truncation=True, max_length=max_length)
        return list(out["input_ids"]), list(out["attention_mask"])

    return encode


class TextDecoder:
    """`Sample -> ({"input_ids", "attention_mask"}, label)`. Picklable: loader workers load
    the tokenizer again from its path."""

    def __init__(
        self, tokenizer: str, max_length: int | None, input_key: str | None, label: Callable
    ):
        self.path, self.input_key, self.label = tokenizer, input_key or "text", label
        self.max_length = max_length or DEFAULT_MAX_LENGTH
        self._encode: Encode | None = load_tokenizer(self.path, self.max_length)  # fails early

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_encode": None}

    def __call__(self, sample: Sample) -> tuple[dict[str, torch.Tensor], int]:
        if self._encode is None:  # unpickled in a loader worker
            self._encode = load_tokenizer(self.path, self.max_length)
        value = fields.lookup(sample.fields, self.input_key)
        if value is None:
            raise SampleError(
                sample.shard,
                sample.key,
                f"missing text field {self.input_key!r}; fields are {fields.names(sample.fields)}"
                "; pass --input-key",
            )
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else value
        except UnicodeDecodeError as exc:
            raise SampleError(sample.shard, sample.key, f"text is not UTF-8: {exc}") from None
        if not isinstance(text, str):
            raise SampleError(
                sample.shard,
                sample.key,
                f"field {self.input_key!r} is not text but {type(text).__name__}",
            )
        ids, mask = self._encode(text)
        if not ids:
            raise SampleError(sample.shard, sample.key, "the text gives no tokens")
        inputs = {
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "attention_mask": torch.tensor(mask, dtype=torch.int64),
        }
        return inputs, self.label(sample)
