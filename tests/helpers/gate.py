"""A --preprocess hook for concurrent-writer tests: the built-in decoder, which on its first
sample waits for a gate to open.

With SAGE_TEST_GATE=PATH it writes PATH.entered on the first decoded sample, then waits until
PATH.open exists (at most 120 s); unset, it is the plain decoder, so gated and ungated runs
share one configuration.
"""

import os
import time
from pathlib import Path

from sage_stream.decode.decoder import make_decoder

_decode = make_decoder()
_waited = False


def decode(sample):
    global _waited
    gate = os.environ.get("SAGE_TEST_GATE")
    if gate and not _waited:
        _waited = True
        Path(gate + ".entered").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not Path(gate + ".open").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return _decode(sample)
