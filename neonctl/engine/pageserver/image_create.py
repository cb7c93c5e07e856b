"""A stopped data directory -> the image layer files of one image (the format is ``image_set.py``'s).

Creating an image walks the data directory once to classify every file (relation fork segment,
relmap, SLRU segment, pg_control, or aux file; skipping what the format leaves out), then
streams the values in key order twice: once for sizes, to cut the key space into partitions of
~64 MiB, and once to write the layers. A timeline's first image is initdb's cluster; every
later one is a directory the redo worker has replayed to the image LSN.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from neonctl.engine.pageserver.image_layer import ImageLayerWriter
from neonctl.engine.pageserver.image_set import (
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
from neonctl.engine.pageserver.layer_name import ImageLayerName
from neonctl.errors import InvalidInput

RELSEG_SIZE = 131072  # blocks per 1 GiB segment file (Postgres' default --with-segsize)
SLRU_PAGES_PER_SEGMENT = 32
DEFAULT_PARTITION_SIZE = 64 << 20

# pg_control: DBState at offset 16, checkPoint at 32, checkPointCopy.redo at 40 (PG 15-18).
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
    data = path.read_bytes()
    if len(data) < 48:
        raise InvalidInput(f"{path} is too short to be pg_control")
    state_code = struct.unpack_from("<i", data, 16)[0]
    checkpoint, redo = struct.unpack_from("<QQ", data, 32)
    state = _DB_STATES.get(state_code)
    if state is None:
        raise InvalidInput(f"cannot image {path.parent.parent}: its cluster state (code {state_code}) is not"
                           " 'shut down' or 'shut down in recovery' - stop Postgres cleanly first")
    return state, checkpoint, redo


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


# -- the ordered stream of values ----------------------------------------------------------------


class _Blocks:
    """Consecutive pages of one file under consecutive keys."""

    __slots__ = ("count", "first_page", "keys", "path")

    def __init__(self, keys: list[Key], path: Path, first_page: int, count: int):
        self.keys, self.path, self.first_page, self.count = keys, path, first_page, count


def _items(scan: _Scan, relseg_size: int, meta: bytes, aux: bytes) -> Iterator[tuple[Key, bytes] | _Blocks]:
    """Every value of the image in key order: (key, bytes) for small values, _Blocks for pages."""
    by_db: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for spc, db, rel, fork in scan.forks:
        by_db.setdefault((spc, db), []).append((rel, fork))
    for loc in sorted(set(by_db) | set(scan.relmaps)):
        if loc in scan.relmaps:
            yield relmap_key(*loc), scan.relmaps[loc].read_bytes()
        for rel, fork in sorted(by_db.get(loc, [])):
            nblocks = 0
            for segno, path, n in scan.forks[(*loc, rel, fork)]:
                if n:
                    base = segno * relseg_size
                    yield _Blocks([rel_block_key(*loc, rel, fork, base + i) for i in range(n)], path, 0, n)
                nblocks += n
            yield rel_size_key(*loc, rel, fork), _U32.pack(nblocks)
    for (kind, segno), (path, n) in sorted(scan.slru.items()):
        if n:
            yield _Blocks([slru_block_key(kind, segno, i) for i in range(n)], path, 0, n)
        yield slru_seg_size_key(kind, segno), _U32.pack(n)
    assert scan.control is not None
    yield controlfile_key(), scan.control.read_bytes()
    yield IMAGE_META_KEY, meta
    yield AUX_FILES_KEY, aux


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

    # pass 1: keys and sizes only, to cut the key space into partitions
    boundaries: list[Key] = []
    acc = 0
    raw_bytes = 0
    for item in _items(scan, relseg_size, meta_bytes, aux):
        if isinstance(item, _Blocks):
            for k in item.keys:
                if acc >= partition_size:
                    boundaries.append(k)
                    acc = 0
                acc += BLCKSZ
            raw_bytes += BLCKSZ * item.count
        else:
            if acc >= partition_size:
                boundaries.append(item[0])
                acc = 0
            acc += len(item[1])
            raw_bytes += len(item[1])
    edges = [MIN_KEY, *boundaries, MAX_KEY]
    ranges = [KeyRange(a, b) for a, b in itertools.pairwise(edges)]

    # pass 2: write
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[ImageLayerFile] = []
    part = 0
    writer = None

    def open_writer(i: int) -> ImageLayerWriter:
        name = ImageLayerName(ranges[i], lsn)
        return ImageLayerWriter(out_dir / str(name), timeline_id, ranges[i], lsn)

    def finish(w: ImageLayerWriter) -> None:
        info = w.finish()
        written.append(ImageLayerFile(info.path.name, str(info.path), info.file_size, str(info.key_range.start),
                                      str(info.key_range.end), info.num_values))

    try:
        writer = open_writer(0)

        def put(key: Key, value: bytes) -> None:
            nonlocal writer, part
            while not ranges[part].contains(key):
                finish(writer)
                part += 1
                writer = open_writer(part)
            writer.put(key, value)

        for item in _items(scan, relseg_size, meta_bytes, aux):
            if isinstance(item, _Blocks):
                with open(item.path, "rb") as f:
                    f.seek(item.first_page * BLCKSZ)
                    i = 0
                    while i < item.count:
                        chunk = f.read(min(128, item.count - i) * BLCKSZ)
                        if len(chunk) % BLCKSZ or not chunk:
                            raise InvalidInput(f"{item.path} changed while it was imaged")
                        view = memoryview(chunk)
                        for j in range(len(chunk) // BLCKSZ):
                            put(item.keys[i + j], bytes(view[j * BLCKSZ:(j + 1) * BLCKSZ]))
                        i += len(chunk) // BLCKSZ
            else:
                put(*item)
        finish(writer)
        while part + 1 < len(ranges):  # a partition whose keys all vanished (cannot happen with pass 1)
            part += 1
            writer = open_writer(part)
            finish(writer)
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        for layer in written:
            Path(layer.path).unlink(missing_ok=True)
        raise
    return ImageInfo(timeline_id=timeline_id, lsn=lsn, checkpoint_lsn=checkpoint_lsn, redo_lsn=redo_lsn,
                     pg_version=pg_version, cluster_state=state, layers=tuple(written), raw_bytes=raw_bytes)


__all__ = ["DEFAULT_PARTITION_SIZE", "RELSEG_SIZE", "create_image"]
