"""A test hook, off unless the environment turns it on: with BMC_SERVE_TEST_GATE=PATH set, every
model run (warm-up included) waits until PATH exists.

The test suite holds a batch mid-run with it (a full queue, a drain on SIGTERM, a model still
loading) and lets it go once it has checked what it needs, instead of racing a slow model against
the clock on a busy machine. An environment variable rather than a flag, so `bmc serve --help`
offers nothing a user could turn on by mistake; a server started with it set says so on stderr.
"""

from __future__ import annotations

import logging
import os
import time

TEST_GATE_ENV = "BMC_SERVE_TEST_GATE"
GATE_POLL_S = 0.005

_gate_path = os.environ.get(TEST_GATE_ENV) or None
_warned = False


def wait_for_test_gate() -> None:
    """Returns at once, unless BMC_SERVE_TEST_GATE names a path: then once that path exists."""
    global _warned
    if _gate_path is None:
        return
    if not _warned:
        _warned = True
        logging.getLogger("bmc.serve").warning("%s is set: every model run waits until %s exists (a test hook)", TEST_GATE_ENV, _gate_path)
    while not os.path.exists(_gate_path):
        time.sleep(GATE_POLL_S)
