"""The pool of stopped compute data directories that endpoint starts are rebuilt from (issue 16).

A cleanly stopped compute's directory differs from a later target only in what changed between the two
points (pageserver images/warm.py, images/rebuild.py), so a project keeps its last few, each beside the
record of its history: `<compute root>/pool/<slot>/pgdata` and `<slot>/recycled-pgdata.json`. Stopping a
compute adds a slot and evicts the oldest beyond the project's bounds (`pool_size` directories,
`pool_max_mb` MiB of files: `neonctl project set`); a start asks the pageserver to take the slot that
needs the fewest writes (the one that is exactly the target, else the fewest changed pages, else the oldest
as a pool of inodes for a full restore). Slots are added, taken and evicted under `pool/.lock`, so a start
never rebuilds a directory that an eviction is deleting; a slot without a record (a crash between two
steps) is never taken for a known state and is evicted first.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POOL_DIR = "pool"
RECORD = "recycled-pgdata.json"  # in each slot, beside its pgdata (the pageserver's warm.py reads it)
DEFAULT_SIZE = 2  # directories kept per project
DEFAULT_MAX_MB = 8192  # their files, at most
LIMITS = "limits.json"  # the project's bounds, for the pageserver's refill


def pool_root(compute_root: Path) -> Path:
    return compute_root / POOL_DIR


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the pool's lock (taking a slot, adding one, evicting)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_record(slot: Path) -> dict | None:
    try:
        return json.loads((slot / RECORD).read_text())
    except (OSError, ValueError):
        return None


def slots(root: Path) -> list[Path]:
    """The slots holding a directory, newest first (a slot without a record counts as the oldest)."""
    if not root.is_dir():
        return []
    found = [s for s in root.iterdir() if not s.name.startswith(".") and (s / "pgdata").is_dir()]
    return sorted(found, key=lambda s: (read_record(s) or {}).get("stopped_at", 0.0), reverse=True)


def has_directory(root: Path) -> bool:
    return bool(slots(root))


def dir_bytes(path: Path) -> int:
    """The bytes of the files under `path` (one lstat each, from the directory listing: `endpoint stop` pays it)."""
    total, stack = 0, [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def _unlist(slot: Path) -> Path | None:
    """Take a slot out of the listing in one rename (a crash then never leaves half a slot listed)."""
    grave = slot.with_name(f".evicted-{slot.name}")
    try:
        os.rename(slot, grave)
    except OSError:
        return None
    return grave


def remove_slot(slot: Path) -> None:
    """Delete a slot."""
    grave = _unlist(slot)
    if grave is not None:
        shutil.rmtree(grave, ignore_errors=True)


def write_limits(root: Path, size: int, max_bytes: int) -> None:
    """Record the project's bounds in the pool, for the pageserver's background refill (which must not grow
    the pool past them and does not read the project's settings)."""
    text = json.dumps({"size": size, "max_bytes": max_bytes})
    path = root / LIMITS
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (LIMITS + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_limits(root: Path) -> tuple[int, int]:
    """(size, max_bytes) as the project last set them; (0, 0) - refill nothing - when never written."""
    try:
        d = json.loads((root / LIMITS).read_text())
        return int(d["size"]), int(d["max_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def filling_dir(root: Path) -> Path:
    """A hidden directory to build a slot in (the pageserver's refill): never listed, so never taken half
    written; one that a crash left behind is removed by the next `keep` or pageserver start."""
    root.mkdir(parents=True, exist_ok=True)
    d = root / f".filling-{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    return d


def keep(root: Path, pgdata: Path, record: dict, size: int, max_bytes: int, only_into_room: bool = False,
         defer_removal: bool = False) -> Path | None:
    """Move a stopped compute's `pgdata` into a new slot with its record, then evict the oldest slots beyond
    `size` directories or `max_bytes`; the new slot, or None when the pool keeps nothing (size 0, or the
    directory alone is over the byte bound). `only_into_room`: a directory made ahead of need (the refill)
    evicts nothing; it is not kept when the pool has no room for it. `defer_removal`: evicted directories are
    only taken out of the listing; the pageserver deletes them (`remove_evicted`) off the caller's clock."""
    nbytes = dir_bytes(pgdata)
    if size <= 0 or nbytes > max_bytes:
        return None
    graves = list(root.glob(".evicted-*"))  # evictions a crash interrupted (or deferred)
    with locked(root):
        if only_into_room:
            listed = slots(root)
            used = sum((read_record(s) or {}).get("bytes") or 0 for s in listed)
            if len(listed) >= size or used + nbytes > max_bytes:
                return None
        slot = root / f"{int(time.time() * 1000):x}-{secrets.token_hex(3)}"
        slot.mkdir()
        os.rename(pgdata, slot / "pgdata")
        tmp = slot / (RECORD + ".tmp")
        tmp.write_text(json.dumps({**record, "stopped_at": time.time(), "bytes": nbytes}))
        os.replace(tmp, slot / RECORD)  # the pageserver checks the directory itself before it believes this
        kept, total = 0, 0
        for s in slots(root):
            rec = read_record(s)
            b = rec.get("bytes") if rec and isinstance(rec.get("bytes"), int) else dir_bytes(s / "pgdata")
            if rec is None or kept >= size or total + b > max_bytes:
                if _unlist(s) is not None:
                    graves.append(s)
                continue
            kept, total = kept + 1, total + b
    if graves and not defer_removal:  # deleted outside the lock: a start waiting for it does not wait
        remove_evicted(root)
    return slot


def remove_evicted(root: Path) -> None:
    """Delete the slots evictions took out of the listing (a 1 GB directory takes a tenth of a second: the
    pageserver does it in the background for `endpoint stop`, see `keep(defer_removal=True)`)."""
    for grave in root.glob(".evicted-*"):
        shutil.rmtree(grave, ignore_errors=True)


def forget_timeline(root: Path, timeline_id: str) -> int:
    """Forget every kept directory of computes that ran on `timeline_id` (its history was cut back below
    where they stopped): their records go, so no start takes them for a known point. How many."""
    n = 0
    with locked(root):
        for s in slots(root):
            rec = read_record(s)
            if rec is not None and rec.get("timeline_id") == timeline_id:
                (s / RECORD).unlink(missing_ok=True)
                n += 1
    return n


def forget_all(root: Path) -> None:
    """Forget every kept directory's history (the next start restores in full; tests and benchmarks)."""
    with locked(root):
        for s in slots(root):
            (s / RECORD).unlink(missing_ok=True)


def usage(root: Path) -> dict:
    """What the pool holds now: directories and bytes (for `status` and the closing figures)."""
    ss = slots(root)
    return {"directories": len(ss),
            "bytes": sum((read_record(s) or {}).get("bytes") or dir_bytes(s / "pgdata") for s in ss)}
