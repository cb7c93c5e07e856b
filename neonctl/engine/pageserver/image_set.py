"""A data directory <-> a set of image layer files, addressed with Neon's keys.

An *image* is a whole data directory at one LSN, stored the way the pageserver stores pages: as
values under 18-byte keys in image layer files (``image_layer.py``), split into contiguous key
ranges of ~64 MiB of uncompressed values. Together the layers of one image cover the entire key
space [MIN_KEY, MAX_KEY), so a key absent from them did not exist at that LSN.

Which file goes where (spc 1663 = ``base/``, spc 1664 = ``global/`` with db 0):

==============================================  ============================================
file                                            key(s) and value
==============================================  ============================================
``base/<db>/<rel>[_fsm|_vm|_init][.N]``,        ``rel_block_key(spc, db, rel, fork, blk)``: the 8 KiB page,
``global/<rel>…``                               blk = N * RELSEG_SIZE + page in segment N;
                                                ``rel_size_key(spc, db, rel, fork)``: nblocks, u32 LE -
                                                for every fork, including empty ones
``base/<db>/pg_filenode.map``,                  ``relmap_key(spc, db)``: the file (512 bytes)
``global/pg_filenode.map``
``pg_xact/XXXX``                                ``slru_block_key(CLOG, segno, page)`` + ``slru_seg_size_key``
``pg_multixact/members/XXXX``                   same, kind MULTIXACT_MEMBERS
``pg_multixact/offsets/XXXX``                   same, kind MULTIXACT_OFFSETS
``global/pg_control``                           ``controlfile_key()``: the file (8 KiB)
image metadata                                  ``checkpoint_key()``: JSON (LSNs, version, modes, ...)
everything else                                 ``AUX_FILES_KEY`` (03 0 0 0 0 2): an uncompressed tar of the
                                                directory skeleton (every directory, even empty,
                                                with its mode) and the remaining files (PG_VERSION,
                                                configs, pg_stat, pg_logical, pg_twophase,
                                                pg_commit_ts, ...); the layer zstd-compresses it
==============================================  ============================================

Deliberately not stored (Postgres recreates, resets or ignores them at a recovery start, and
pg_basebackup leaves them out too): the contents of ``pg_wal`` (its subdirectories are kept
empty; a materialiser puts the WAL in), ``pg_replslot``, ``pg_stat_tmp``, ``pg_subtrans``
(zeroed at startup), ``pg_dynshmem``, ``pg_notify``, ``pg_serial``, ``pg_snapshots``;
``postmaster.pid``/``.opts``, ``backup_label*``, ``tablespace_map*``, signal files,
``pg_internal.init`` (relcache init files, removed at recovery start), temporary relations
(``t<backend>_<rel>``) and ``pgsql_tmp`` directories and files; and every fork but ``_init`` of an *unlogged*
relation - recovery deletes those forks and copies the init fork over the main fork, so their
contents are never read (Neon keeps only the init fork as well). Symlinks (tablespaces in
``pg_tblspc``, a symlinked ``pg_wal``) are not followed or stored; ``pg_wal`` is restored as a
directory.

Restoring writes relation and SLRU files with the data directory's file mode (0600, or 0640 for
a group-readable cluster) and every directory and aux file with its recorded mode; files are
owned by the caller (chown to the Postgres user afterwards). Zero-length segment files beyond a
fork's last block (left by a truncation) are recorded in the metadata and recreated, so a
restore is byte-for-byte the original minus the skipped files above.
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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from neonctl.engine.pageserver.image_layer import ImageLayerReader, ImageLayerWriter
from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    SINGLETON_PREFIX,
    Key,
    KeyRange,
    SlruKind,
    checkpoint_key,
    controlfile_key,
    rel_block_key,
    rel_size_key,
    relmap_key,
    slru_block_key,
    slru_seg_size_key,
)
from neonctl.engine.pageserver.layer_name import ImageLayerName
from neonctl.errors import CorruptData, InvalidInput

AUX_FILES_KEY = Key(SINGLETON_PREFIX, 0, 0, 0, 0, 2)
IMAGE_META_KEY = checkpoint_key()
FORMAT = "neonctl-image-v1"

BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per 1 GiB segment file (Postgres' default --with-segsize)
SLRU_PAGES_PER_SEGMENT = 32
DEFAULT_PARTITION_SIZE = 64 << 20
DEFAULTTABLESPACE_OID = 1663
GLOBALTABLESPACE_OID = 1664

FORKS = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}
FORK_SUFFIX = {v: k for k, v in FORKS.items()}
INIT_FORK = 3
SLRU_DIRS = {"pg_xact": SlruKind.CLOG, "pg_multixact/members": SlruKind.MULTIXACT_MEMBERS,
             "pg_multixact/offsets": SlruKind.MULTIXACT_OFFSETS}
SLRU_DIR_OF = {v: k for k, v in SLRU_DIRS.items()}

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


# -- description of an image -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLayerFile:
    name: str
    path: str
    file_size: int
    key_start: str
    key_end: str
    num_values: int

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(Key.parse(self.key_start), Key.parse(self.key_end))


@dataclass(frozen=True)
class ImageInfo:
    """The layer files of one image and what a materialiser needs to know about them."""

    timeline_id: str
    lsn: int  # I: pages are at or before I; usable for target LSNs X >= I
    checkpoint_lsn: int  # C: the checkpoint recovery must start from (in pg_control)
    redo_lsn: int  # R: its redo point - WAL from here on is needed
    pg_version: int
    cluster_state: str  # "shut down" or "shut down in recovery"
    layers: tuple[ImageLayerFile, ...]
    raw_bytes: int = 0  # uncompressed size of all values

    @property
    def paths(self) -> list[Path]:
        return [Path(layer.path) for layer in self.layers]

    @property
    def file_size(self) -> int:
        return sum(layer.file_size for layer in self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def key_ranges(self) -> list[KeyRange]:
        return [layer.key_range for layer in self.layers]

    def relocated(self, directory: str | os.PathLike[str]) -> ImageInfo:
        """The same image with its layer files looked up in ``directory`` (paths are stored absolute)."""
        layers = tuple(replace(layer, path=str(Path(directory) / layer.name)) for layer in self.layers)
        return replace(self, layers=layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageInfo:
        d = dict(d)
        d["layers"] = tuple(ImageLayerFile(**layer) for layer in d["layers"])
        return cls(**d)


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


# -- restore --------------------------------------------------------------------------------------


def _open_image(layer_paths: Sequence[str | os.PathLike[str]]) -> list[ImageLayerReader]:
    readers: list[ImageLayerReader] = []
    try:
        for p in layer_paths:
            readers.append(ImageLayerReader(p))
        readers.sort(key=lambda r: r.key_range.start)
        if not readers:
            raise InvalidInput("an image needs at least one layer file")
        lsns = {r.lsn for r in readers}
        if len(lsns) != 1:
            raise InvalidInput(f"image layers at different LSNs: {sorted(lsns)}")
        expected = MIN_KEY
        for r in readers:
            if r.key_range.start != expected:
                raise InvalidInput(f"image layers do not cover the key space contiguously: {r.path} starts at"
                                   f" {r.key_range.start}, expected {expected}")
            expected = r.key_range.end
        if expected != MAX_KEY:
            raise InvalidInput(f"image layers end at {expected}, not at the end of the key space")
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def _get(readers: list[ImageLayerReader], key: Key) -> bytes:
    for r in readers:
        if r.key_range.contains(key):
            value = r.get(key)
            if value is None:
                raise CorruptData(f"{r.path}: image has no {key} (not an image made by create_image?)")
            return value
    raise CorruptData(f"no image layer covers {key}")


def read_image_meta(layer_paths: Sequence[str | os.PathLike[str]]) -> dict:
    """The metadata stored in an image (LSNs, pg version, cluster state, modes)."""
    readers = _open_image(layer_paths)
    try:
        return _load_meta(readers)
    finally:
        for r in readers:
            r.close()


def _load_meta(readers: list[ImageLayerReader]) -> dict:
    try:
        meta = json.loads(_get(readers, IMAGE_META_KEY))
    except ValueError as e:
        raise CorruptData(f"image metadata is not JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CorruptData(f"unknown image format {meta.get('format')!r}")
    return meta


def image_info_from_layers(layer_paths: Sequence[str | os.PathLike[str]]) -> ImageInfo:
    readers = _open_image(layer_paths)
    try:
        meta = _load_meta(readers)
        layers = tuple(ImageLayerFile(Path(r.path).name, str(r.path), os.path.getsize(r.path),
                                      str(r.key_range.start), str(r.key_range.end), -1) for r in readers)
    finally:
        for r in readers:
            r.close()
    return ImageInfo(timeline_id=meta["timeline_id"], lsn=meta["lsn"], checkpoint_lsn=meta["checkpoint_lsn"],
                     redo_lsn=meta["redo_lsn"], pg_version=meta["pg_version"], cluster_state=meta["cluster_state"],
                     layers=layers)


class _FileWriter:
    """Writes pages into the segment files of one relation fork or SLRU segment, in order."""

    def __init__(self, target: Path, mode: int):
        self.target, self.mode = target, mode
        self.fds: dict[str, int] = {}
        self.buf_path: str | None = None
        self.buf_offset = 0
        self.buf = bytearray()

    def _fd(self, relpath: str) -> int:
        fd = self.fds.get(relpath)
        if fd is None:
            fd = os.open(self.target / relpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.mode)
            os.fchmod(fd, self.mode)
            self.fds[relpath] = fd
        return fd

    def write(self, relpath: str, offset: int, data: bytes) -> None:
        if relpath != self.buf_path or offset != self.buf_offset + len(self.buf) or len(self.buf) >= 1 << 20:
            self.flush()
            self.buf_path, self.buf_offset = relpath, offset
        self.buf += data

    def flush(self) -> None:
        if self.buf_path is not None and self.buf:
            os.pwrite(self._fd(self.buf_path), self.buf, self.buf_offset)
        self.buf_path, self.buf = None, bytearray()

    def set_size(self, relpath: str, size: int) -> None:
        self.flush()
        os.ftruncate(self._fd(relpath), size)

    def close_all(self) -> None:
        self.flush()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _rel_path(spc: int, db: int, rel: int, fork: int, segno: int) -> str:
    if spc == GLOBALTABLESPACE_OID and db == 0:
        d = "global"
    elif spc == DEFAULTTABLESPACE_OID:
        d = f"base/{db}"
    else:
        raise CorruptData(f"image holds tablespace {spc}, which neonctl does not restore")
    return f"{d}/{rel}{FORK_SUFFIX[fork]}" + (f".{segno}" if segno else "")


def _relmap_path(spc: int, db: int) -> str:
    return "global/pg_filenode.map" if spc == GLOBALTABLESPACE_OID else f"base/{db}/pg_filenode.map"


def _slru_path(kind: int, segno: int) -> str:
    return f"{SLRU_DIR_OF[SlruKind(kind)]}/{segno:04X}"


def restore_image(layer_paths: Sequence[str | os.PathLike[str]], target_dir: str | os.PathLike[str]) -> dict:
    """Recreate the data directory of an image in ``target_dir`` (absent or empty); returns its metadata."""
    target = Path(target_dir)
    readers = _open_image(layer_paths)
    try:
        meta = _load_meta(readers)
        if meta["blcksz"] != BLCKSZ:
            raise CorruptData(f"image has {meta['blcksz']}-byte pages; neonctl handles {BLCKSZ}")
        relseg = meta["relseg_size"]
        if target.exists() and any(target.iterdir()):
            raise InvalidInput(f"target directory {target} is not empty")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(_get(readers, AUX_FILES_KEY)), mode="r:") as tar:
            tar.extractall(target, filter="data")
        # the data filter ignores directory modes of existing dirs only; set them all explicitly
        with tarfile.open(fileobj=io.BytesIO(_get(readers, AUX_FILES_KEY)), mode="r:") as tar:
            for member in tar.getmembers():
                os.chmod(target / member.name, member.mode & 0o7777)
        file_mode = meta["file_mode"]
        out = _FileWriter(target, file_mode)
        try:
            for r in readers:
                for key, value in r.iter_all():
                    f1 = key.field1
                    if f1 == 0 and key.is_rel_block():
                        spc, db, rel, fork = key.rel_tag()
                        blk = key.field6
                        out.write(_rel_path(spc, db, rel, fork, blk // relseg), (blk % relseg) * BLCKSZ, value)
                    elif f1 == 0 and key.is_rel_size():
                        spc, db, rel, fork = key.rel_tag()
                        (nblocks,) = _U32.unpack(value)
                        nsegs = max(1, -(-nblocks // relseg))
                        for segno in range(nsegs):
                            out.set_size(_rel_path(spc, db, rel, fork, segno),
                                         min(relseg, nblocks - segno * relseg) * BLCKSZ)
                        out.close_all()  # a fork is complete: release its descriptors
                    elif f1 == 0 and key.is_relmap():
                        _write_small(target / _relmap_path(key.field2, key.field3), value, file_mode)
                    elif key.is_slru_block():
                        out.write(_slru_path(key.field2, key.field4), key.field6 * BLCKSZ, value)
                    elif key.is_slru_seg_size():
                        (npages,) = _U32.unpack(value)
                        out.set_size(_slru_path(key.field2, key.field4), npages * BLCKSZ)
                        out.close_all()
                    elif key.is_controlfile():
                        _write_small(target / "global" / "pg_control", value, file_mode)
                    elif key in (IMAGE_META_KEY, AUX_FILES_KEY):
                        pass
                    else:
                        raise CorruptData(f"{r.path}: unexpected key {key} in an image")
        finally:
            out.close_all()
        for rel in meta["empty_segments"]:
            _write_small(target / rel, b"", file_mode)
        os.chmod(target, meta["dir_mode"])
        return meta
    finally:
        for r in readers:
            r.close()


def _write_small(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


__all__ = [
    "AUX_FILES_KEY",
    "DEFAULT_PARTITION_SIZE",
    "IMAGE_META_KEY",
    "ImageInfo",
    "ImageLayerFile",
    "create_image",
    "image_info_from_layers",
    "read_image_meta",
    "restore_image",
]
