"""Failpoints: named places where a test can make the pageserver die like a kill -9.

Set ``NEONCTL_FAILPOINTS=name1,name2`` in the daemon's environment; reaching a
listed point sends SIGKILL to the process itself, so crash-consistency tests
hit exactly the step they mean to (between writing a layer and its index, ...).
"""

from __future__ import annotations

import os
import signal

_ACTIVE = {p for p in os.environ.get("NEONCTL_FAILPOINTS", "").split(",") if p}


def failpoint(name: str) -> None:
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
