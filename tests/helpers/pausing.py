"""A --preprocess hook for stop tests on Ray: the built-in decoder, pausing at the Nth call.

Calls are counted in a file (SAGE_TEST_PAUSE_COUNTER, one byte per call, across processes);
the first call to reach SAGE_TEST_PAUSE_AT touches `<counter>.paused` and sleeps, so that the
test can stop the driver while its workers are busy. Unset, it is the plain built-in decoder,
so stopped and uninterrupted runs share one configuration.
"""

import contextlib
import os
import time

from sage_stream.decode.decoder import make_decoder

_decode = make_decoder()


def decode(sample):
    counter = os.environ.get("SAGE_TEST_PAUSE_COUNTER")
    if counter:
        with open(counter, "ab") as f:  # one byte per call: appends do not race
            f.write(b".")
        if os.path.getsize(counter) >= int(os.environ["SAGE_TEST_PAUSE_AT"]):
            with contextlib.suppress(FileExistsError):
                os.close(os.open(f"{counter}.paused", os.O_CREAT | os.O_EXCL))
                time.sleep(300)
    return _decode(sample)
