"""Per-thread scratch buffers for bulk kernels' short-lived outputs.

A fresh multi-megabyte buffer costs page faults on first touch - on this kind of
VM about as much as the kernel that fills it. Outputs that are consumed before
the same thread asks for the same buffer again (a layer's framed value region,
WAL read for one scan, the sources merged for one freeze) reuse one buffer per
name and thread instead. Never hand out a view that outlives that.
"""

from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(name: str, size: int) -> np.ndarray:
    """A uint8 buffer of ``size`` bytes (contents undefined), valid until this thread's next ``scratch(name)``."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(name)
    if buf is None or len(buf) < size:
        buf = bufs[name] = np.empty(max(size, 1 << 20, int(len(buf) * 1.25) if buf is not None else 0), np.uint8)
    return buf[:size]
