"""A stopped data directory -> the image layer files of one image (the format is ``image_set.py``'s).

Creating an image walks the data directory once to classify every file (relation fork segment,
relmap, SLRU segment, pg_control, or aux file; skipping what the format leaves out) and lists
the values in key order as runs - a segment file's pages are one run of consecutive keys. The
sizes alone cut the key space into partitions of ~64 MiB; then each partition is read (one read
per file piece) into one buffer and written as a layer in one bulk call, so no Python runs per
page. A timeline's first image is initdb's cluster; every later one is a directory the redo
worker has replayed to the image LSN.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import stat
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neonctl.engine.pageserver.images.image_set import (
    AUX_FILES_KEY,
    BLCKSZ,
    DEFAULTTABLESPACE_OID,
    FORKS,
    FORMAT,
    GLOBALTABLESPACE_OID,
    IMAGE_META_KEY,
    INIT_FORK,
    SLRU_DIRS,
    ImageInfo,
    ImageLayerFile,
)
from neonctl.engine.pageserver.images.warm import control
from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    Key,
    KeyRange,
    controlfile_key,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_block_key,
    slru_seg_size_key,
)
from neonctl.engine.pageserver.key_columns import key_runs
from neonctl.engine.pageserver.storage_layer.image_layer import (
    ImageValues,
    write_image_layer,
)
from neonctl.engine.pageserver.storage_layer.layer_name import ImageLayerName
from neonctl.engine.scratch import scratch
from neonctl.errors import InvalidInput

RELSEG_SIZE = 131072  # blocks per 1 GiB segment file (Postgres' default --with-segsize)
SLRU_PAGES_PER_SEGMENT = 32
DEFAULT_PARTITION_SIZE = 64 << 20

_DB_STATES = {1: "shut down", 2: "shut down in recovery"}
_SKIP_FILES = {"postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map",
               "tablespace_map.old", "standby.signal", "recovery.signal", "postgresql.auto.conf.tmp",
               "current_logfiles.tmp"}
_SKIP_CONTENTS = {"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_subtrans", "pg_dynshmem", "pg_notify",
                  "pg_serial", "pg_snapshots", "pg_tblspc"}
_REL_RE = re.compile(r"(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?")
_TEMP_REL_RE = re.compile(r"t\d+_\d+.*")
_SLRU_SEG_RE = re.compile(r"[0-9A-F]{4,}")
_U32 = struct.Struct("<I")


@dataclass
class _Scan:
    forks: dict[tuple[int, int, int, int], list[tuple[int, Path, int]]] = field(default_factory=dict)
    relmaps: dict[tuple[int, int], Path] = field(default_factory=dict)
    slru: dict[tuple[int, int], tuple[Path, int]] = field(default_factory=dict)
    control: Path | None = None
    dirs: list[str] = field(default_factory=list)
    aux_files: list[str] = field(default_factory=list)
    empty_segments: list[str] = field(default_factory=list)


def _read_pg_control(path: Path) -> tuple[str, int, int]:
    ctl = control(path.parent.parent)
    if ctl is None:
        raise InvalidInput(f"{path} is missing or too short to be pg_control")
    state = _DB_STATES.get(ctl.state)
    if state is None:
        raise InvalidInput(f"cannot image {path.parent.parent}: its cluster state (code {ctl.state}) is not"
                           " 'shut down' or 'shut down in recovery' - stop Postgres cleanly first")
    return state, ctl.checkpoint, ctl.redo


def _rel_dir_location(rel_parts: tuple[str, ...]) -> tuple[int, int] | None:
    """(spc, db) when a path's directory is global/ or base/<db>/."""
    if rel_parts == ("global",):
        return GLOBALTABLESPACE_OID, 0
    if len(rel_parts) == 2 and rel_parts[0] == "base" and rel_parts[1].isdigit():
        return DEFAULTTABLESPACE_OID, int(rel_parts[1])
    return None


def _scan(pgdata: Path, relseg_size: int) -> _Scan:
    scan = _Scan()
    for root, dirs, files in os.walk(pgdata):
        rel_root = Path(root).relative_to(pgdata)
        parts = rel_root.parts
        dirs[:] = sorted(d for d in dirs if not (Path(root, d).is_symlink() or d.startswith("pgsql_tmp")))
        top = parts[0] if parts else ""
        if top in _SKIP_CONTENTS and top != "pg_wal":
            dirs[:] = []  # keep the directory itself, nothing inside (slot directories, ...)
        for d in dirs:
            scan.dirs.append(str(rel_root / d))
        if top in _SKIP_CONTENTS:
            continue  # pg_wal keeps its subdirectories (archive_status, summaries), no files
        location = _rel_dir_location(parts)
        slru_kind = SLRU_DIRS.get("/".join(parts))
        # unlogged relations: only the init fork matters (recovery resets the rest from it)
        unlogged = {m.group(1) for f in files if (m := _REL_RE.fullmatch(f)) and m.group(2) == "_init"}
        for name in sorted(files):
            path = Path(root, name)
            relpath = str(rel_root / name)
            if path.is_symlink() or not path.is_file():
                continue
            if not parts and name in _SKIP_FILES:
                continue
            if name == "pg_internal.init" or name.startswith("pgsql_tmp") or _TEMP_REL_RE.fullmatch(name):
                continue
            if location is not None:
                spc, db = location
                m = _REL_RE.fullmatch(name)
                if m:
                    rel, fork_suffix, segno = int(m.group(1)), m.group(2) or "", int(m.group(3) or 0)
                    fork = FORKS[fork_suffix]
                    if m.group(1) in unlogged and fork != INIT_FORK:
                        continue
                    if rel == 0:
                        raise InvalidInput(f"unexpected relation file {relpath}")
                    size = path.stat().st_size
                    if size % BLCKSZ:
                        raise InvalidInput(f"cannot image {relpath}: {size} bytes is not a whole number of pages")
                    if size > relseg_size * BLCKSZ:
                        raise InvalidInput(f"cannot image {relpath}: larger than a segment ({relseg_size} pages)")
                    scan.forks.setdefault((spc, db, rel, fork), []).append((segno, path, size // BLCKSZ))
                    continue
                if name == "pg_filenode.map":
                    scan.relmaps[location] = path
                    continue
                if name == "pg_control" and location == (GLOBALTABLESPACE_OID, 0):
                    scan.control = path
                    continue
            if slru_kind is not None and _SLRU_SEG_RE.fullmatch(name):
                size = path.stat().st_size
                if size % BLCKSZ or size > SLRU_PAGES_PER_SEGMENT * BLCKSZ:
                    raise InvalidInput(f"cannot image {relpath}: {size} bytes is not an SLRU segment")
                scan.slru[(int(slru_kind), int(name, 16))] = (path, size // BLCKSZ)
                continue
            scan.aux_files.append(relpath)
    for tag, segs in scan.forks.items():
        segs.sort()
        nblocks = 0
        for i, (segno, path, n) in enumerate(segs):
            if segno != i:
                raise InvalidInput(f"relation {tag} has a gap before segment {path.name}")
            if n == 0 and segno > 0:
                scan.empty_segments.append(str(path.relative_to(pgdata)))
            elif nblocks != segno * relseg_size:
                raise InvalidInput(f"relation {tag}: segment {path.name} follows a segment that is not full")
            nblocks += n
    if scan.control is None:
        raise InvalidInput(f"{pgdata} has no global/pg_control")
    return scan


# -- the ordered values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """``count`` values under consecutive keys from ``first``: pages 0.. of the file ``path``, or the one
    value ``data``. A segment file is one run, so its keys and its reads need no Python per page."""

    first: Key
    count: int
    path: Path | None = None
    data: bytes = b""

    @property
    def value_size(self) -> int:
        return BLCKSZ if self.path is not None else len(self.data)

    def key(self, i: int) -> Key:
        return self.first._replace(field6=self.first.field6 + i)


def _runs(scan: _Scan, relseg_size: int, meta: bytes, aux: bytes) -> list[_Run]:
    """Every value of the image in key order."""
    by_db: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for spc, db, rel, fork in scan.forks:
        by_db.setdefault((spc, db), []).append((rel, fork))
    runs = []
    for loc in sorted(set(by_db) | set(scan.relmaps)):
        if loc in scan.relmaps:
            runs.append(_Run(relmap_key(*loc), 1, data=scan.relmaps[loc].read_bytes()))
        for rel, fork in sorted(by_db.get(loc, [])):
            nblocks = 0
            for segno, path, n in scan.forks[(*loc, rel, fork)]:
                if n:
                    runs.append(_Run(rel_block_key(*loc, rel, fork, segno * relseg_size), n, path))
                nblocks += n
            runs.append(_Run(rel_size_key(*loc, rel, fork), 1, data=_U32.pack(nblocks)))
    for (kind, segno), (path, n) in sorted(scan.slru.items()):
        if n:
            runs.append(_Run(slru_block_key(kind, segno, 0), n, path))
        runs.append(_Run(slru_seg_size_key(kind, segno), 1, data=_U32.pack(n)))
    assert scan.control is not None
    runs.append(_Run(controlfile_key(), 1, data=scan.control.read_bytes()))
    runs.append(_Run(IMAGE_META_KEY, 1, data=meta))
    runs.append(_Run(AUX_FILES_KEY, 1, data=aux))
    return runs


_Piece = tuple[_Run, int, int]  # values [i, i + count) of a run


def _partitions(runs: list[_Run], partition_size: int) -> list[list[_Piece]]:
    """Cut the values into partitions: a new one starts at the first value after ``partition_size`` bytes."""
    parts: list[list[_Piece]] = [[]]
    acc = 0
    for run in runs:
        size, i = run.value_size, 0
        while i < run.count:
            if acc >= partition_size:
                parts.append([])
                acc = 0
            # values until this partition is full: the check above fires again after the k-th
            k = run.count - i if size == 0 else min(run.count - i, max(1, -(-(partition_size - acc) // size)))
            parts[-1].append((run, i, k))
            acc += k * size
            i += k
    return parts


def _read_pages(path: Path, first_page: int, out: np.ndarray) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        view, got = memoryview(out), 0
        while got < len(out):
            n = os.preadv(fd, [view[got:]], first_page * BLCKSZ + got)
            if n == 0:
                raise InvalidInput(f"{path} changed while it was imaged")
            got += n
    finally:
        os.close(fd)


def _partition_values(pieces: list[_Piece]) -> ImageValues:
    """One partition's keys and values as columns; pages are read one piece of a file at a time.

    The values live in a scratch buffer, valid until this thread's next partition.
    """
    counts = np.array([c for _, _, c in pieces], dtype=np.int64)
    sizes = np.array([run.value_size for run, _, _ in pieces], dtype=np.int64)
    keys = key_runs(np.frombuffer(b"".join(run.key(i).to_bytes() for run, i, _ in pieces), dtype=np.uint8), counts)
    length = np.repeat(sizes, counts)
    nbytes = sizes * counts
    buf = scratch("image-values", int(nbytes.sum()))
    pos = 0
    for (run, i, _), n in zip(pieces, nbytes.tolist(), strict=True):
        if run.path is None:
            buf[pos:pos + n] = np.frombuffer(run.data, dtype=np.uint8)
        else:
            _read_pages(run.path, i, buf[pos:pos + n])
        pos += n
    return ImageValues(keys, buf, np.cumsum(length) - length, length)


def _aux_tar(pgdata: Path, scan: _Scan) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in scan.dirs:
            info = tar.gettarinfo(pgdata / rel, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            tar.addfile(info)
        for rel in scan.aux_files:
            info = tar.gettarinfo(pgdata / rel, arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(pgdata / rel, "rb") as f:
                data = f.read()
            info.size = len(data)  # the file may have changed since stat; store what was read
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- create ---------------------------------------------------------------------------------------


def create_image(pgdata: str | os.PathLike[str], out_dir: str | os.PathLike[str], timeline_id: str, lsn: int,
                 checkpoint_lsn: int, redo_lsn: int, *, partition_size: int = DEFAULT_PARTITION_SIZE,
                 relseg_size: int = RELSEG_SIZE) -> ImageInfo:
    """Write the image layers of a cleanly stopped data directory at ``lsn``.

    ``pgdata`` must be "shut down" (then ``lsn`` >= its shutdown checkpoint) or "shut down in
    recovery" as the redo worker leaves it (then ``lsn`` is the LSN it replayed to);
    ``checkpoint_lsn``/``redo_lsn`` must be what its pg_control says. Layers go to ``out_dir``
    under their Neon-style names, one per ~``partition_size`` bytes of uncompressed values.
    """
    pgdata, out_dir = Path(pgdata), Path(out_dir)
    if not (pgdata / "PG_VERSION").is_file():
        raise InvalidInput(f"{pgdata} is not a data directory")
    if (pgdata / "postmaster.pid").exists():
        raise InvalidInput(f"{pgdata} has a postmaster.pid: stop Postgres before imaging it")
    state, ctl_checkpoint, ctl_redo = _read_pg_control(pgdata / "global" / "pg_control")
    if (ctl_checkpoint, ctl_redo) != (checkpoint_lsn, redo_lsn):
        raise InvalidInput(f"{pgdata}: pg_control has checkpoint {ctl_checkpoint:#x} / redo {ctl_redo:#x},"
                           f" not {checkpoint_lsn:#x} / {redo_lsn:#x}")
    if not redo_lsn <= checkpoint_lsn <= lsn:
        raise InvalidInput(f"image LSN {lsn:#x} is before its checkpoint {checkpoint_lsn:#x}")
    pg_version = int((pgdata / "PG_VERSION").read_text().strip().split(".")[0])
    scan = _scan(pgdata, relseg_size)
    file_mode = stat.S_IMODE(scan.control.stat().st_mode) if scan.control else 0o600
    meta = {
        "format": FORMAT, "timeline_id": timeline_id, "lsn": lsn, "checkpoint_lsn": checkpoint_lsn,
        "redo_lsn": redo_lsn, "pg_version": pg_version, "cluster_state": state, "blcksz": BLCKSZ,
        "relseg_size": relseg_size, "dir_mode": stat.S_IMODE(pgdata.stat().st_mode), "file_mode": file_mode,
        "empty_segments": scan.empty_segments,
    }
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    aux = _aux_tar(pgdata, scan)

    runs = _runs(scan, relseg_size, meta_bytes, aux)
    raw_bytes = sum(run.count * run.value_size for run in runs)
    parts = _partitions(runs, partition_size)
    edges = [MIN_KEY, *(run.key(i) for run, i, _ in (part[0] for part in parts[1:])), MAX_KEY]
    ranges = [KeyRange(a, b) for a, b in itertools.pairwise(edges)]

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[ImageLayerFile] = []
    try:
        for key_range, pieces in zip(ranges, parts, strict=True):
            path = out_dir / str(ImageLayerName(key_range, lsn))
            info = write_image_layer(path, timeline_id, key_range, lsn, _partition_values(pieces))
            written.append(ImageLayerFile(path.name, str(path), info.file_size, str(key_range.start),
                                          str(key_range.end), info.num_values))
    except BaseException:
        for layer in written:
            Path(layer.path).unlink(missing_ok=True)
        raise
    return ImageInfo(timeline_id=timeline_id, lsn=lsn, checkpoint_lsn=checkpoint_lsn, redo_lsn=redo_lsn,
                     pg_version=pg_version, cluster_state=state, layers=tuple(written), raw_bytes=raw_bytes)


__all__ = ["DEFAULT_PARTITION_SIZE", "RELSEG_SIZE", "create_image"]
