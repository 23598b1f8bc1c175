"""A --preprocess hook for kill tests: SIGKILLs its own process on the Nth decoded sample.

The counter lives in a file (SAGE_TEST_KILL_COUNTER) so it counts across both passes; with the
variable unset it is the plain built-in decoder, so killed and uninterrupted runs share one
configuration. SAGE_TEST_KILL_SIGNAL=TERM sends SIGTERM instead (an orchestrator's stop).
"""

import os
import signal
from pathlib import Path

from sage_stream.decode.decoder import make_decoder

_decode = make_decoder()


def decode(sample):
    counter = os.environ.get("SAGE_TEST_KILL_COUNTER")
    if counter:
        path = Path(counter)
        n = int(path.read_text() or 0) + 1 if path.exists() else 1
        path.write_text(str(n))
        if n == int(os.environ["SAGE_TEST_KILL_AT"]):
            os.kill(
                os.getpid(), signal.Signals["SIG" + os.environ.get("SAGE_TEST_KILL_SIGNAL", "KILL")]
            )
    return _decode(sample)
