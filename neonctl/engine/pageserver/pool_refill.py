"""Refill the pool of stopped directories ahead of need, from the newest image of a busy branch.

Starts are fast when the pool (compute/dir_pool.py) holds a directory close to the target: the rebuild then
writes only what differs. But the pool empties exactly when it matters - a branch's compute takes its own
kept directory and runs, and the next start (a branch at a past time of that busy parent, a restore) finds
nothing and restores the whole database. So when the pool is below its size and the project's active
timeline has no kept directory it could be rebuilt from, the pageserver writes one in the background: the
files of the timeline's newest image, restored in a low-priority child process into a hidden directory and
listed only once complete, with a record saying it is exactly that image (`from_image`). A later rebuild
treats it like a cleanly stopped directory whose history is that image's point (Timeline._rebuild_plan).

Small databases are left alone (a full restore of them is as fast as a rebuild, and a test suite that
starts a branch per test should not pay a background restore per start): only images of at least
`NEONCTL_POOL_REFILL_MIN_MB` (default 64) MiB are refilled. The refill never evicts a kept directory.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from neonctl.engine.compute import dir_pool
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.images.image_set import ImageInfo

log = logging.getLogger("pageserver.refill")

ACTIVE_WINDOW = 600.0  # s: a timeline that received WAL this recently is the one to refill for
DEFAULT_MIN_MB = 64
NICENESS = 19  # the child process: behind ingest, starts and every compute


def min_bytes() -> int:
    try:
        return int(os.environ.get("NEONCTL_POOL_REFILL_MIN_MB", DEFAULT_MIN_MB)) << 20
    except ValueError:
        return DEFAULT_MIN_MB << 20


@dataclass(frozen=True)
class RefillJob:
    timeline_id: str  # the busy timeline it is for
    image: ImageInfo
    size: int
    max_bytes: int

    @property
    def record(self) -> dict:
        return {"timeline_id": self.image.timeline_id, "start_lsn": self.image.lsn, "from_image": self.image.lsn,
                "for_timeline": self.timeline_id}


def _lineage(tl) -> set[str]:
    out = set()
    t = tl
    while t is not None:
        out.add(t.timeline_id)
        t = t.ancestor
    return out


def short(root: Path) -> bool:
    """Whether the pool holds fewer directories than its size (cheap: a listing and one small file)."""
    size, _ = dir_pool.read_limits(root)
    return size > 0 and len(dir_pool.slots(root)) < size


def plan(timelines: Iterable, root: Path, now: float) -> RefillJob | None:
    """What to write into the pool now, or None: the most recently active timeline whose newest image is big
    enough, when the pool has room and no kept directory of its history that starts at or after that image
    (one a rebuild could use)."""
    size, max_bytes = dir_pool.read_limits(root)
    listed = dir_pool.slots(root)
    if size <= 0 or len(listed) >= size:
        return None
    records = [dir_pool.read_record(s) or {} for s in listed]
    used = sum(r.get("bytes") or 0 for r in records)
    active = sorted((t for t in timelines if now - t.last_ingest_at < ACTIVE_WINDOW
                     and t.layers is not None), key=lambda t: t.last_ingest_at, reverse=True)
    for tl in active:
        try:
            image = tl.image_for(tl.last_record_lsn)
        except Exception:  # noqa: BLE001 - no image (yet): nothing to refill from
            continue
        nbytes = sum(layer.num_values for layer in image.layers) * 8192
        if nbytes < min_bytes() or used + nbytes > max_bytes:
            continue
        lineage = _lineage(tl)
        if any(r.get("timeline_id") in lineage and int(r.get("start_lsn", -1)) >= image.lsn for r in records):
            continue  # a kept directory of this history can already be rebuilt to its head
        return RefillJob(tl.timeline_id, image, size, max_bytes)
    return None


async def fill(job: RefillJob, root: Path) -> bool:
    """Write the job's directory in a niced child process; whether the pool now lists it. Cancelling this
    kills the child (the hidden directory is removed by the next refill or pageserver start)."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "neonctl.engine.pageserver.pool_refill", "--root", str(root),
        "--record", json.dumps(job.record), "--size", str(job.size), "--max-bytes", str(job.max_bytes),
        *[str(p) for p in job.image.paths], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_lower_priority)  # noqa: PLW1509 - nice(2) and ioprio_set(2) only, before exec
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        log.warning("pool refill for %s failed (exit %s): %s", job.timeline_id, proc.returncode, text[-500:])
        return False
    log.info("pool refill for %s: image %s@%s, %s (%.1f s)", job.timeline_id, job.image.timeline_id,
             format_lsn(job.image.lsn), text or "done", time.monotonic() - t0)
    return "kept" in text


_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
IOPRIO_IDLE = 3 << 13  # IOPRIO_PRIO_VALUE(IOPRIO_CLASS_IDLE, 0): disk time only when nobody else wants it


def _lower_priority() -> None:
    """In the child before exec: the lowest CPU priority, and the idle I/O class where the kernel has it."""
    os.nice(NICENESS)
    nr = _IOPRIO_SET.get(os.uname().machine)
    if nr is not None:
        ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, IOPRIO_IDLE)  # IOPRIO_WHO_PROCESS, this one


def remove_leftovers(root: Path) -> None:
    """Directories a refill was writing when its process or the pageserver died."""
    for d in root.glob(".filling-*"):
        shutil.rmtree(d, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """The child process: restore the image's files into a hidden directory, then list it if there is room."""
    from neonctl.engine.pageserver.images.restore import restore_image  # noqa: PLC0415 - the child only

    p = argparse.ArgumentParser(prog="neonctl-pool-refill")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--max-bytes", type=int, required=True)
    p.add_argument("layers", nargs="+")
    a = p.parse_args(argv)
    work = dir_pool.filling_dir(a.root)
    try:
        restore_image(a.layers, work / "pgdata")
        _fsync_tree(work / "pgdata")  # listed means exact: a power loss must not leave a record over lost pages
        slot = dir_pool.keep(a.root, work / "pgdata", json.loads(a.record), a.size, a.max_bytes, only_into_room=True)
        print(f"kept as {slot.name}" if slot is not None else "not kept: the pool filled up meanwhile")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
