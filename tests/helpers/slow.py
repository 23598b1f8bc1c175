"""--preprocess hooks for loader tests: the built-in decoder, slowed down on one shard or
failing on some keys, so that workers finish out of order."""

import time

from sage_stream.decode.decoder import make_decoder
from sage_stream.errors import SampleError

_decode = make_decoder()


def decode(sample):
    if sample.shard.startswith("part-000"):
        time.sleep(0.01)  # the first shard is slow: later shards are ready before it
    if sample.key.endswith("7"):
        raise SampleError(sample.shard, sample.key, "keys ending in 7 do not decode")
    return _decode(sample)
