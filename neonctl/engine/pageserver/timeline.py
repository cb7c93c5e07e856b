"""A pageserver timeline: the storage truth for one branch.

A timeline is (ancestor timeline, ancestor LSN) plus its own WAL. The root
timeline starts from an imported initdb image (``initdb.tar.zst``, as Neon
keeps it) whose shutdown checkpoint ends at ``initdb_lsn``; everything after is
WAL ingested from the safekeepers, kept in segment files under the timeline's
id. ``last_record_lsn`` only ever points at the end of a complete, CRC-valid
record: that is the LSN a compute can be materialised at.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.lsn import WAL_SEGMENT_SIZE, format_lsn, segment_file_name
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder, find_end_of_wal
from neonctl.engine.wal.segments import SegmentedWal
from neonctl.errors import InvalidInput, NotFound, PostgresError

# Files of a data directory that never belong in a stored image.
_EXCLUDED = {"postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old",
             "tablespace_map", "recovery.signal", "standby.signal"}


@dataclass
class TimelineMetadata:
    timeline_id: str
    pg_version: int
    system_id: int
    ancestor_timeline: str | None
    ancestor_lsn: int
    initdb_lsn: int  # end of the base image's shutdown checkpoint record
    base_checkpoint_lsn: int
    base_redo_lsn: int
    last_record_lsn: int
    wal_seg_size: int = WAL_SEGMENT_SIZE


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class Timeline:
    def __init__(self, directory: Path):
        self.dir = directory
        meta_path = directory / "metadata.json"
        if not meta_path.exists():
            raise NotFound(f"timeline {directory.name} does not exist in the pageserver")
        self.meta = TimelineMetadata(**json.loads(meta_path.read_text()))
        self.wal = SegmentedWal(directory / "wal", self.meta.wal_seg_size)
        self.received_lsn = self.meta.last_record_lsn
        self.sk_flush_lsn = 0  # what the safekeeper we stream from has flushed
        self._waiters: list = []

    def notify(self) -> None:
        """Wake coroutines waiting for ingest progress (called on the event loop)."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_progress(self, timeout: float) -> None:
        import asyncio  # noqa: PLC0415

        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    @property
    def timeline_id(self) -> str:
        return self.meta.timeline_id

    @property
    def last_record_lsn(self) -> int:
        return self.meta.last_record_lsn

    def save_metadata(self) -> None:
        _write_json_atomic(self.dir / "metadata.json", asdict(self.meta))

    # -- import ---------------------------------------------------------------

    @classmethod
    def import_initdb(cls, directory: Path, timeline_id: str, pgdata: Path, bin_dir: Path,
                      pg_version: int) -> "Timeline":
        """Make a root timeline from a cleanly shut down data directory (initdb's output)."""
        cd = read_control_data(bin_dir, pgdata)
        if cd.state != "shut down":
            raise PostgresError(f"cannot import {pgdata}: cluster state is {cd.state!r}, not 'shut down'")
        directory.mkdir(parents=True)
        wal = SegmentedWal(directory / "wal")
        segno = cd.checkpoint_lsn // WAL_SEGMENT_SIZE
        src = pgdata / "pg_wal" / segment_file_name(segno)
        data = src.read_bytes()
        wal.write(segno * WAL_SEGMENT_SIZE, data)
        end = find_end_of_wal(wal.read, cd.checkpoint_lsn, (segno + 1) * WAL_SEGMENT_SIZE)
        if end <= cd.checkpoint_lsn:
            raise PostgresError(f"cannot find the shutdown checkpoint record at {format_lsn(cd.checkpoint_lsn)}")
        wal.truncate(end)
        wal.close()
        with open(directory / "initdb.tar.zst", "wb") as raw:
            with zstandard.ZstdCompressor(level=3).stream_writer(raw) as zw:
                with tarfile.open(fileobj=zw, mode="w|") as tar:
                    for entry in sorted(pgdata.iterdir()):
                        if entry.name in _EXCLUDED:
                            continue
                        if entry.name == "pg_wal":
                            tar.add(entry, arcname="pg_wal", recursive=False)
                            tar.add(entry / "archive_status", arcname="pg_wal/archive_status", recursive=False)
                            continue
                        tar.add(entry, arcname=entry.name)
        meta = TimelineMetadata(
            timeline_id=timeline_id, pg_version=pg_version, system_id=cd.system_id,
            ancestor_timeline=None, ancestor_lsn=0, initdb_lsn=end,
            base_checkpoint_lsn=cd.checkpoint_lsn, base_redo_lsn=cd.redo_lsn, last_record_lsn=end,
        )
        _write_json_atomic(directory / "metadata.json", asdict(meta))
        return cls(directory)

    # -- ingest ---------------------------------------------------------------

    def ingest(self, start_lsn: int, data: bytes) -> int:
        """Take WAL bytes [start_lsn, ...) from a safekeeper; return the new last_record_lsn.

        The stream always restarts at last_record_lsn, so a partial record at
        the tail is simply fetched again with the rest of it next time; bytes
        past the last complete record are never trusted.
        """
        if start_lsn != self.meta.last_record_lsn:
            raise InvalidInput(
                f"WAL for {self.timeline_id} must continue at {format_lsn(self.meta.last_record_lsn)},"
                f" got {format_lsn(start_lsn)}")
        decoder = WalStreamDecoder(start_lsn, self.meta.wal_seg_size)
        decoder.feed(data)
        end = start_lsn
        try:
            while (rec := decoder.poll()) is not None:
                end = rec.end_lsn
        except WalDecodeError:
            pass  # a torn or overwritten tail: keep what was valid, fetch again later
        self.received_lsn = start_lsn + len(data)
        if end > start_lsn:
            self.wal.write(start_lsn, data[: end - start_lsn])
            self.wal.flush()
            self.meta.last_record_lsn = end
            self.save_metadata()
        return end

    # -- materialisation ------------------------------------------------------

    def materialize(self, lsn: int, target: Path) -> None:
        """Build a data directory that Postgres crash-recovers to exactly `lsn`.

        Base image + WAL from its redo point; the segment holding `lsn` is
        zeroed after it and no later segment is included; a ``backup_label``
        (method pg_rewind) names the base checkpoint so that recovery replays
        from it - without it a clean base would silently skip all redo.
        """
        if not (self.meta.initdb_lsn <= lsn <= self.meta.last_record_lsn):
            raise InvalidInput(
                f"LSN {format_lsn(lsn)} is outside {format_lsn(self.meta.initdb_lsn)}.."
                f"{format_lsn(self.meta.last_record_lsn)} for timeline {self.timeline_id}")
        if target.exists() and any(target.iterdir()):
            raise InvalidInput(f"target directory {target} is not empty")
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        with open(self.dir / "initdb.tar.zst", "rb") as raw:
            with zstandard.ZstdDecompressor().stream_reader(raw) as zr:
                with tarfile.open(fileobj=zr, mode="r|") as tar:
                    tar.extractall(target, filter="fully_trusted")
        pg_wal = target / "pg_wal"
        pg_wal.mkdir(exist_ok=True)
        (pg_wal / "archive_status").mkdir(exist_ok=True)
        seg = self.meta.wal_seg_size
        for segno in range(self.meta.base_redo_lsn // seg, lsn // seg + 1):
            self.wal.copy_segment_to(segno, pg_wal / segment_file_name(segno, seg_size=seg), upto_lsn=lsn)
        for name in ("pg_replslot",):
            d = target / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
        (target / "postgresql.auto.conf").write_text(
            "# Written by neonctl: the compute is configured afresh at every start.\n")
        redo, ckpt = self.meta.base_redo_lsn, self.meta.base_checkpoint_lsn
        (target / "backup_label").write_text(
            f"START WAL LOCATION: {format_lsn(redo)} (file {segment_file_name(redo // seg, seg_size=seg)})\n"
            f"CHECKPOINT LOCATION: {format_lsn(ckpt)}\n"
            "BACKUP METHOD: pg_rewind\n"
            "BACKUP FROM: primary\n"
            "START TIME: 2000-01-01 00:00:00 UTC\n"
            f"LABEL: neonctl materialize {self.timeline_id}@{format_lsn(lsn)}\n"
            "START TIMELINE: 1\n")


def open_timeline(workdir: Path, timeline_id: str) -> Timeline:
    return Timeline(workdir / "timelines" / timeline_id)


def timeline_dir(workdir: Path, timeline_id: str) -> Path:
    return workdir / "timelines" / timeline_id


def list_timelines(workdir: Path) -> list[str]:
    d = workdir / "timelines"
    return sorted(p.name for p in d.iterdir() if (p / "metadata.json").exists()) if d.exists() else []


__all__ = ["Timeline", "TimelineMetadata", "open_timeline", "list_timelines", "timeline_dir"]
