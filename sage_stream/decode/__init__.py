"""Decode: a read `Sample` → ``(input, label)`` → model-ready batches; bad samples become
recorded skips. Read in the order the data flows:

    fields     where a sample's input and label are (tar members, Parquet columns, nested
               structs, Hugging Face Image structs)
    decoder    the built-in decoder (.npy, images, integer labels, list columns) or a user
               --preprocess: Sample -> (tensor, label); `make_decoder` picks one
    images     --resize, --crop, --normalize, --image-mode, applied to each decoded image
    text       --tokenizer, --max-length: text -> {input_ids, attention_mask}
    batches    (input, label) pairs -> batches grouped by shape; skips kept in stream order

The shard loop (passes/loop.py) and the training feed (feed/) use it; what to do with a skip
(--on-error) is the shard loop's.
"""
