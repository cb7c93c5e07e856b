"""The one way tests wait: poll a condition until it holds, or fail saying what never happened.

A condition is a callable; a truthy result ends the wait and is returned. A NeonctlError or OSError raised
by it (a daemon still starting, a socket not there yet) counts as "not yet", and the last one is shown if
the wait times out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from neonctl.errors import NeonctlError

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float = 30.0, what: str = "the condition",
               interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = cond()
            if last:
                return last
        except (NeonctlError, OSError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)
