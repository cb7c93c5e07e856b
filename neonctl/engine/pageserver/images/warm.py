"""Warm start: hand a cleanly stopped compute's data directory back unchanged when it is exactly the target.

A compute that shut down cleanly leaves a directory whose state is known to the byte: its pg_control says
"shut down" at a shutdown checkpoint, and that checkpoint is the last record of the branch's WAL. When the
next start of the branch asks for exactly that point (nothing was written since), the directory *is* the
data directory a full materialisation would build, so Postgres starts on it as after `pg_ctl stop`:
no image restore, no WAL replay. The cost of a start then no longer grows with the database.

Anything not exactly known disqualifies the directory (it then goes the full way, `restore.py`): no
record of which timeline it ran on, a state other than "shut down" (a crash, a kill -9, an immediate
stop), another system, a checkpoint that is not the storage WAL's last record before the target, or a
checkpoint record in the directory's own pg_wal that differs from storage's by a single byte (so a
directory of another branch that happens to stop at the same LSN is never taken).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from neonctl.engine.compute import dir_pool
from neonctl.engine.lsn import format_lsn, segment_file_name
from neonctl.engine.wal.decoder import RM_XLOG_ID, XLOG_CHECKPOINT_SHUTDOWN
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder

log = logging.getLogger("pageserver.warm")

RECORD = dir_pool.RECORD  # beside the kept directory: {"timeline_id": ...}, written by endpoint stop
DB_SHUTDOWNED = 1
_STALE = ("postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map",
          "recovery.signal", "standby.signal")


def read_record(pool: Path) -> dict | None:
    try:
        return json.loads((pool.parent / RECORD).read_text())
    except (OSError, ValueError):
        return None


class ControlFields(NamedTuple):
    system_id: int
    state: int  # DBState: 1 shut down, 2 shut down in recovery, 6 in production, ...
    checkpoint: int
    redo: int
    tli: int


def control(pgdata: Path) -> ControlFields | None:
    """What neonctl reads of a directory's pg_control (the same offsets in PG 15-18); None if unreadable."""
    try:
        data = (pgdata / "global" / "pg_control").read_bytes()
    except OSError:
        return None
    if len(data) < 56:
        return None
    (system_id,) = struct.unpack_from("<Q", data, 0)
    (state,) = struct.unpack_from("<i", data, 16)
    checkpoint, redo = struct.unpack_from("<QQ", data, 32)
    (tli,) = struct.unpack_from("<I", data, 48)
    return ControlFields(system_id, state, checkpoint, redo, tli)


def logged_hints(pgdata: Path) -> bool:
    """Whether the compute that ran in `pgdata` had wal_log_hints on (its postgresql.conf, last setting wins)."""
    try:
        text = (pgdata / "postgresql.conf").read_text()
    except OSError:
        return False
    value = None
    for line in text.splitlines():
        name, _, rest = line.partition("=")
        if name.strip() == "wal_log_hints":
            value = rest.split("#", 1)[0].strip().strip("'").lower()
    return value in ("on", "true", "1", "yes")


def _only_record(read: Callable[[int, int], bytes], start: int, end: int, seg_size: int):
    """The one complete record in [start, end), or None if there is not exactly one ending at `end`."""
    dec = WalStreamDecoder(start, seg_size)
    try:
        dec.feed(read(start, end - start))
        rec = dec.poll()
        if rec is None or rec.end_lsn != end or dec.poll() is not None:
            return None
    except (WalDecodeError, OSError, ValueError):
        return None
    return rec


def reusable(pool: Path, lsn: int, timeline_id: str, lineage: set[str], system_id: int,
             read_wal: Callable[[int, int], bytes], seg_size: int) -> str | None:
    """Why the kept directory `pool` cannot serve as the data directory at `lsn` - or None when it can.

    `lineage` is the target timeline and, when it has no WAL of its own yet, the ancestor it starts at
    `lsn` from: the directory must have run on one of them.
    """
    record = read_record(pool)
    if record is None or record.get("timeline_id") not in lineage:
        return "it ran on another branch (or its record is missing)"
    ctl = control(pool)
    if ctl is None:
        return "no readable pg_control"
    sysid, state, checkpoint, tli = ctl.system_id, ctl.state, ctl.checkpoint, ctl.tli
    if sysid != system_id:
        return "another system"
    if state != DB_SHUTDOWNED:
        return f"not shut down cleanly (state {state})"
    if not checkpoint < lsn:
        return f"its checkpoint {format_lsn(checkpoint)} is not before {format_lsn(lsn)}"
    stored = _only_record(read_wal, checkpoint, lsn, seg_size)
    if stored is None or stored.rmid != RM_XLOG_ID or stored.info & 0xF0 != XLOG_CHECKPOINT_SHUTDOWN:
        return f"the WAL after its shutdown checkpoint {format_lsn(checkpoint)} does not end at {format_lsn(lsn)}"
    segno = checkpoint // seg_size
    wal_file = pool / "pg_wal" / segment_file_name(segno, tli, seg_size)

    def read_own(at: int, n: int) -> bytes:
        with open(wal_file, "rb") as f:
            f.seek(at - segno * seg_size)
            return f.read(n)

    own = _only_record(read_own, checkpoint, lsn, seg_size) if (lsn - 1) // seg_size == segno else None
    if own is None or own.data != stored.data:
        return "its own WAL does not hold the storage's shutdown checkpoint"
    return None


def forget(pool: Path) -> None:
    """The kept directory is in use again: its record no longer describes anything."""
    (pool.parent / RECORD).unlink(missing_ok=True)


def take(pool: Path, target: Path) -> None:
    """Move the kept directory into place as it is, minus what a clean start must not find."""
    forget(pool)
    if target.exists():
        target.rmdir()
    os.rename(pool, target)
    os.chmod(target, 0o700)
    for name in _STALE:
        (target / name).unlink(missing_ok=True)
    reset_unlogged(target)


def reset_unlogged(pgdata: Path) -> int:
    """What Postgres does to unlogged relations after a crash, done here so a warm start matches a
    materialised one (unlogged data is not in the WAL): every fork but the init fork goes, and the init
    fork is copied to the main fork. Returns the number of relations reset."""
    n = 0
    for db in [pgdata / "global", *sorted((pgdata / "base").iterdir())]:
        if not db.is_dir():
            continue
        inits = {p.name[: -len("_init")] for p in db.iterdir() if p.name.endswith("_init")}
        for p in db.iterdir():
            stem = p.name.split(".", 1)[0].removesuffix("_fsm").removesuffix("_vm")
            if stem in inits and not p.name.endswith("_init"):
                p.unlink()
        for rel in inits:
            shutil.copy(db / f"{rel}_init", db / rel)  # with its mode
            n += 1
    if n:
        log.info("%s: reset %d unlogged relation(s)", pgdata, n)
    return n
