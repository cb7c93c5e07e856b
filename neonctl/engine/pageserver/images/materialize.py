"""Materialising a compute's data directory from an image instead of from initdb.

Same contract as ``Timeline.materialize(X, target)``: the directory crash-recovers to exactly X
(a record end), on Postgres timeline 1, with exactly the data committed at X. Only the start
differs: the files come from an image at LSN I (``image_set``), so the WAL to put in ``pg_wal``
- and to replay - starts at the image's redo point R instead of initdb's.

Steps: restore the image's files; WAL segments from R's segment up to X's, X's zeroed after X,
no later segment; ``pg_replslot`` emptied; ``postgresql.auto.conf`` reset; a ``backup_label``
naming the image's checkpoint C and redo point R.

The label depends on the image's pg_control state (measured on PG 18 and PG 15):

- "shut down in recovery" (made by the redo worker): ``BACKUP METHOD: streamed`` and ``BACKUP
  FROM: standby``. For a label "from a standby" Postgres takes the end of the backup from
  pg_control's minRecoveryPoint, which the redo worker's shutdown restartpoint left at I - so
  Postgres itself refuses X < I ("FATAL: WAL ends before end of online backup") on top of our
  own check. ``BACKUP METHOD: pg_rewind`` (``label_method="pg_rewind"``, the label initdb-based
  materialisation always used) works just as well for X >= I, but X < I is not caught: PG 15
  comes up, and once new transactions reuse the xids of those after X, their rows (on the
  image's pages) become visible - measured: 2000 phantom rows after 300 single-row commits;
  PG 18 happened to fail with "xlog flush request ... is not satisfied".
- "shut down" (a cleanly stopped primary, initdb): ``BACKUP METHOD: pg_rewind`` naming the
  shutdown checkpoint; a "from standby" label is rejected there ("FATAL: backup_label contains
  data inconsistent with control file", PG 15 and 18).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from neonctl.engine.lsn import WAL_SEGMENT_SIZE, format_lsn, segment_file_name
from neonctl.engine.pageserver.images.image_set import ImageInfo
from neonctl.engine.pageserver.images.rebuild import left_pages, rebuild_from_image, verify_against_restore
from neonctl.engine.pageserver.images.replay_inits import check_replay_inits
from neonctl.engine.pageserver.images.restore import (
    image_info_from_layers,
    restore_image,
)
from neonctl.errors import InvalidInput

log = logging.getLogger("pageserver.materialize")
ReadWal = Callable[[int, int], bytes]
CopyWal = Callable[[int, int, int, int], None]  # (lsn, length, destination fd, destination offset)
XLOG_BLCKSZ = 8192  # WAL page size


def write_wal(pg_wal: Path, read_wal: ReadWal, redo_lsn: int, lsn: int, seg_size: int = WAL_SEGMENT_SIZE,
              copy_wal: CopyWal | None = None) -> int:
    """Segments from redo_lsn's through lsn's into pg_wal, zero after lsn; returns the bytes of WAL written.
    ``copy_wal(lsn, n, fd, offset)``, when given, copies the same bytes inside the kernel instead."""
    pg_wal.mkdir(exist_ok=True)
    (pg_wal / "archive_status").mkdir(exist_ok=True)
    for old in pg_wal.iterdir():
        if old.is_file():
            old.unlink()
    first = redo_lsn // seg_size
    for segno in range(first, lsn // seg_size + 1):
        start = segno * seg_size
        cut = min(seg_size, max(0, lsn - start))
        # In the redo point's segment recovery reads only the first page (its long header, checked when the
        # segment is opened) and the pages from the redo point on: the rest stays a hole, never written.
        skip_from, skip_to = (XLOG_BLCKSZ, (redo_lsn - start) // XLOG_BLCKSZ * XLOG_BLCKSZ) if segno == first \
            else (0, 0)
        parts = [(0, min(cut, skip_from) if skip_to > skip_from else cut)]
        if skip_to > skip_from and cut > skip_to:
            parts.append((skip_to, cut))
        fd = os.open(pg_wal / segment_file_name(segno, seg_size=seg_size), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)
            for lo, hi in parts:
                if copy_wal is not None:
                    if hi > lo:
                        copy_wal(start + lo, hi - lo, fd, lo)
                    continue
                data = read_wal(start + lo, hi - lo) if hi > lo else b""
                if len(data) != hi - lo:
                    raise InvalidInput(f"WAL for segment {segment_file_name(segno, seg_size=seg_size)} is "
                                       f"incomplete: got {len(data)} of {hi - lo} bytes at offset {lo}")
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, lo)
                    view, lo = view[n:], lo + n
            os.ftruncate(fd, seg_size)  # zeros after lsn: Postgres stops exactly there
        finally:
            os.close(fd)
    return lsn - redo_lsn


def backup_label(checkpoint_lsn: int, redo_lsn: int, method: str, label: str,
                 seg_size: int = WAL_SEGMENT_SIZE) -> str:
    if method == "pg_rewind":
        backup_method, backup_from = "pg_rewind", "primary"
    elif method == "standby":
        backup_method, backup_from = "streamed", "standby"
    else:
        raise ValueError(f"unknown backup_label method {method!r}")
    return (
        f"START WAL LOCATION: {format_lsn(redo_lsn)} "
        f"(file {segment_file_name(redo_lsn // seg_size, seg_size=seg_size)})\n"
        f"CHECKPOINT LOCATION: {format_lsn(checkpoint_lsn)}\n"
        f"BACKUP METHOD: {backup_method}\n"
        f"BACKUP FROM: {backup_from}\n"
        "START TIME: 2000-01-01 00:00:00 UTC\n"
        f"LABEL: {label}\n"
        "START TIMELINE: 1\n"
    )


def prepare_for_recovery(
    target: Path,
    read_wal: ReadWal,
    lsn: int,
    checkpoint_lsn: int,
    redo_lsn: int,
    method: str,
    label: str,
    seg_size: int = WAL_SEGMENT_SIZE,
    copy_wal: CopyWal | None = None,
) -> int:
    """WAL, slots, auto.conf and backup_label of a restored directory; returns the WAL bytes from R to X.

    No check of X against the image's LSN here - ``materialize_from_image`` does that.
    """
    wal_bytes = write_wal(target / "pg_wal", read_wal, redo_lsn, lsn, seg_size, copy_wal)
    for name in (
        "backup_label",
        "backup_label.old",
        "tablespace_map",
        "standby.signal",
        "recovery.signal",
        "postmaster.pid",
        "postmaster.opts",
    ):
        (target / name).unlink(missing_ok=True)
    slots = target / "pg_replslot"
    if slots.exists():
        shutil.rmtree(slots)
    slots.mkdir(mode=0o700)
    os.chmod(slots, 0o700)
    _write(target / "postgresql.auto.conf", "# Written by neonctl: the compute is configured afresh at every start.\n")
    _write(target / "backup_label", backup_label(checkpoint_lsn, redo_lsn, method, label, seg_size))
    return wal_bytes


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def materialize_from_image(
    image: ImageInfo | Sequence[str | os.PathLike[str]],
    read_wal: ReadWal,
    lsn: int,
    target: str | os.PathLike[str],
    *,
    checkpoint_lsn: int | None = None,
    redo_lsn: int | None = None,
    label_method: str | None = None,
    seg_size: int = WAL_SEGMENT_SIZE,
    recycle: bool = False,
    changed=None,
    left=None,
    copy_wal: CopyWal | None = None,
) -> int:
    """Build a data directory at ``lsn`` from an image plus WAL; returns the bytes of WAL to replay.

    ``image`` is an ``ImageInfo`` or the paths of its layer files (then C/R come from the image's
    metadata unless given). ``read_wal(start, length)`` returns WAL bytes as the timeline sees
    them (``Timeline.read_wal``); it is asked for whole segments from the start of R's segment up
    to ``lsn``. ``lsn`` must be a record end at or after the image's LSN: an image's pages may
    hold changes made up to its LSN, so an earlier target is refused. ``recycle``: ``target``
    holds an old data directory to overwrite (``restore_image``). ``changed``: ``target`` holds a stopped
    compute's directory whose pages with these keys (sorted S18) are rewritten from the image (``rebuild.py``);
    ``left``: the keys of the other pages it changed, which the replay rewrites whole (``replay_inits.py``) -
    only the oracle looks at them.
    """
    info = image if isinstance(image, ImageInfo) else image_info_from_layers(image)
    checkpoint_lsn = info.checkpoint_lsn if checkpoint_lsn is None else checkpoint_lsn
    redo_lsn = info.redo_lsn if redo_lsn is None else redo_lsn
    if lsn < info.lsn:
        raise InvalidInput(
            f"cannot materialise at {format_lsn(lsn)} from an image at {format_lsn(info.lsn)}:"
            " its pages may already hold later changes",
            hint="use an older image or initdb's",
        )
    if not redo_lsn <= checkpoint_lsn <= lsn:
        raise InvalidInput(
            f"checkpoint {format_lsn(checkpoint_lsn)} / redo {format_lsn(redo_lsn)} do not precede {format_lsn(lsn)}"
        )
    if label_method is None:
        label_method = "standby" if info.cluster_state == "shut down in recovery" else "pg_rewind"
    if label_method == "standby" and info.cluster_state != "shut down in recovery":
        raise InvalidInput("a 'from standby' backup_label needs an image shut down in recovery")
    target = Path(target)
    t0 = time.perf_counter()
    if changed is not None:
        meta = rebuild_from_image(info.paths, target, changed)
        if os.environ.get("NEONCTL_VERIFY_REBUILD"):
            left = changed[:0] if left is None else left
            check_replay_inits(read_wal, redo_lsn, lsn, seg_size, left)
            verify_against_restore(info.paths, target, target.parent / "verify-full-restore.tmp",
                                   left_pages(left, meta["relseg_size"]))
    else:
        meta = restore_image(info.paths, target, recycle=recycle)
    if (meta["checkpoint_lsn"], meta["redo_lsn"]) != (checkpoint_lsn, redo_lsn):
        raise InvalidInput(
            f"the image's pg_control names checkpoint {format_lsn(meta['checkpoint_lsn'])}, not"
            f" {format_lsn(checkpoint_lsn)}"
        )
    t1 = time.perf_counter()
    wal = prepare_for_recovery(
        target,
        read_wal,
        lsn,
        checkpoint_lsn,
        redo_lsn,
        label_method,
        f"neonctl image {info.timeline_id}@{format_lsn(info.lsn)} -> {format_lsn(lsn)}",
        seg_size,
        copy_wal,
    )
    log.info("%s: %s %.0f ms (%s), WAL and label %.0f ms (%d bytes)", target, "rebuild" if changed is not None
             else "restore", (t1 - t0) * 1000, ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in meta.get("timings", {})
                                                          .items()), (time.perf_counter() - t1) * 1000, wal)
    return wal


__all__ = ["backup_label", "materialize_from_image", "prepare_for_recovery", "write_wal"]
