"""The redo worker's last data directory, kept as the starting point of the next image.

An image at I is a copy of a directory the redo worker replayed to I and shut down in
recovery. The next image of that timeline starts from this (its newest) image: restoring
it file by file costs about as much as writing it - on some disks more, creating a file
can cost a millisecond of kernel time - while the directory the image was made from
still holds exactly those pages. So it is kept: the next image gives it the WAL from the
image's redo point, a fresh ``backup_label`` and replays, as after a restore.

One directory per pageserver: image creation is serial (the pageserver's image lock), and
a busy database is usually one timeline. It is dropped when another timeline images,
when it no longer belongs to the newest image of its timeline, when its timeline is
deleted, and at start-up.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

KEPT = "redo-kept"  # the directory's name in the scratch directory


class RedoDirCache:
    def __init__(self, scratch: Path):
        self.path = scratch / KEPT
        self.owner: tuple[str, int] | None = None  # (timeline id, image LSN) the kept directory is
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        shutil.rmtree(self.path, ignore_errors=True)  # left by an earlier run: owner unknown

    def take(self, timeline_id: str, image_lsn: int, dest: Path) -> bool:
        """Move the directory the image (timeline_id, image_lsn) was made from to dest; False if not kept."""
        with self._lock:
            hit = self.owner == (timeline_id, image_lsn) and self.path.is_dir()
            self.owner = None
            if hit:
                os.rename(self.path, dest)
                self.hits += 1
            else:
                shutil.rmtree(self.path, ignore_errors=True)
                self.misses += 1
            return hit

    def keep(self, timeline_id: str, image_lsn: int, pgdata: Path) -> None:
        """Keep the directory an image was just made from (moved: pgdata is gone afterwards)."""
        with self._lock:
            shutil.rmtree(self.path, ignore_errors=True)
            os.rename(pgdata, self.path)
            self.owner = (timeline_id, image_lsn)

    def forget(self, timeline_id: str) -> None:
        """A deleted timeline's directory goes at once."""
        with self._lock:
            if self.owner is not None and self.owner[0] == timeline_id:
                self.owner = None
                shutil.rmtree(self.path, ignore_errors=True)
