"""A text job with no code: a Parquet `text` column, a local tokenizer, a transformers
classifier.

    sage-stream run 'DATA/*.parquet' --tokenizer DATA/tokenizer.json --max-length 64 \\
        --model examples.models:bert_classifier --model-arg num_labels=3 \\
        --model-arg vocab_size=64 --label-key label --keep 0.5 --out OUT

`--tokenizer` is a tokenizers `.json` file or a Hugging Face tokenizer folder (from
`save_pretrained`); each text becomes `input_ids` and `attention_mask`, padded per batch.
With a real proxy, add `--checkpoint` (the model's state dict) and the factory's own size
arguments; here the model is untrained (no --checkpoint), so its scores mean little.

    python examples/text_job.py WORKDIR      # needs tokenizers and transformers (hf extra)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sage_stream.cli import main as sage_stream

TOPICS = [["apple", "pear", "plum", "fig"], ["car", "bus", "train", "bike"],
          ["rain", "snow", "wind", "sun"]]  # fmt: skip
COMMON = ["the", "a", "is", "and", "very", "today", "we", "saw"]


def make_tokenizer(path: Path) -> str:
    """A word-level tokenizer with BERT's special tokens, saved as a tokenizers .json file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *COMMON, *(w for t in TOPICS for w in t)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


def make_data(folder: Path, n: int = 36) -> list[str]:
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(COMMON, 3)) + list(rng.choice(TOPICS[i % 3], 2 + i % 4))
        texts.append(" ".join(rng.permutation(words)))
        labels.append(i % 3)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reviews.parquet"
    pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return [str(path)]


def main(argv: list[str]) -> int:
    work = Path(argv[0] if argv else "text-job")
    tokenizer = make_tokenizer(work / "data" / "tokenizer.json")
    inputs = make_data(work / "data")
    flags = ["--tokenizer", tokenizer, "--max-length", "64", "--model",
             "examples.models:bert_classifier", "--model-arg", "num_labels=3", "--model-arg",
             "vocab_size=64", "--label-key", "label", "--keep", "0.5"]  # fmt: skip
    extra = argv[1:] or ["--no-progress"]
    return sage_stream(["run", *inputs, *flags, "--out", str(work / "out"), *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
