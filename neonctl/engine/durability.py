"""Making renames and new directory entries durable.

A file's fsync does not persist its name: after creating or renaming a file,
the directory holding it must be fsynced too, or a crash can lose the entry
while keeping whatever was written after it (an index naming a layer that is
gone). Every writer that commits by rename uses this.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory (or any path opened read-only), making its entries durable."""
    fd = os.open(Path(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
