"""The image layer files of one image -> its data directory again, and an image's metadata.

Restoring checks that the layers tile the whole key space at one LSN, unpacks the aux tar
(directory skeleton and small files), then writes every page, relation size, relmap, SLRU
segment and pg_control back to its file. The materialiser uses it to give a compute (or the
redo worker) a data directory to start recovery from. A layer is read whole (checksums verified,
one batch decompression) and its keys are classified column-wise, so a run of consecutive pages
of one file goes out with one write instead of Python per page.

Restoring writes relation and SLRU files with the data directory's file mode (0600, or 0640 for
a group-readable cluster) and every directory and aux file with its recorded mode; files are
owned by the caller (chown to the Postgres user afterwards). Zero-length segment files beyond a
fork's last block (left by a truncation) are recorded in the metadata and recreated.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from neonctl.engine.pageserver.images.image_set import (
    AUX_FILES_KEY,
    BLCKSZ,
    DEFAULTTABLESPACE_OID,
    FORK_SUFFIX,
    FORMAT,
    GLOBALTABLESPACE_OID,
    IMAGE_META_KEY,
    SLRU_DIR_OF,
    ImageInfo,
    ImageLayerFile,
)
from neonctl.engine.pageserver.key import (
    MAX_KEY,
    MIN_KEY,
    REL_PREFIX,
    SIZE_MARKER,
    SLRU_PREFIX,
    Key,
    SlruKind,
)
from neonctl.engine.pageserver.key_columns import key_fields
from neonctl.engine.pageserver.storage_layer.image_layer import (
    ImageLayerReader,
    ImageValues,
)
from neonctl.errors import CorruptData, InvalidInput

_U32 = struct.Struct("<I")
_OTHER, _REL_PAGE, _REL_SIZE, _SLRU_PAGE, _SLRU_SIZE, _RELMAP = range(6)


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


def load_page_meta(readers: list[ImageLayerReader]) -> dict:
    """The image's metadata, for reading its pages: refused when its page size is not ours."""
    meta = _load_meta(readers)
    if meta["blcksz"] != BLCKSZ:
        raise CorruptData(f"image has {meta['blcksz']}-byte pages; neonctl handles {BLCKSZ}")
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
    """Writes runs of pages into segment files, keeping each file open until its fork or segment is complete.

    ``in_place`` (restoring into a recycled directory): an existing file is overwritten where it is
    and cut to its exact size when closed, instead of being truncated first - rewriting a file's
    blocks costs nothing like creating it (see ``restore_image``). Every path written is recorded.
    """

    def __init__(self, target: Path, mode: int, in_place: bool = False):
        self.target, self.mode, self.in_place = target, mode, in_place
        self._root = str(target) + os.sep  # joined as strings: a Path per file was a tenth of a rebuild's time
        self.fds: dict[str, int] = {}
        self.written: set[str] = set()
        self._end: dict[str, int] = {}
        self._sized: set[str] = set()
        self._stat: dict[str, os.stat_result | None] = {}  # files as found, before this writer touched them
        self._size: dict[str, int] = {}  # the size of each file this writer opened, kept up to date

    def _existing(self, relpath: str) -> os.stat_result | None:
        if relpath not in self._stat:
            try:
                self._stat[relpath] = os.stat(self._root + relpath)
            except FileNotFoundError:
                self._stat[relpath] = None
        return self._stat[relpath]

    def existing_size(self, relpath: str) -> int:
        """The file's size as found (0 if absent); one stat per file, shared with `set_size`."""
        st = self._existing(relpath)
        return 0 if st is None else st.st_size

    def _fd(self, relpath: str) -> int:
        fd = self.fds.get(relpath)
        if fd is None:
            found = self._existing(relpath) if self.in_place and relpath not in self._size else None
            flags = os.O_WRONLY | os.O_CREAT | (0 if self.in_place else os.O_TRUNC)
            fd = os.open(self._root + relpath, flags, self.mode)
            if found is None or found.st_mode & 0o7777 != self.mode:
                os.fchmod(fd, self.mode)
            if relpath not in self._size:
                self._size[relpath] = 0 if found is None else found.st_size
            self.fds[relpath] = fd
            self.written.add(relpath)
        return fd

    def write(self, relpath: str, offset: int, data: np.ndarray) -> None:
        fd, view = self._fd(relpath), memoryview(data)
        end = offset + len(view)
        self._end[relpath] = max(self._end.get(relpath, 0), end)
        self._size[relpath] = max(self._size[relpath], end)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def set_size(self, relpath: str, size: int) -> None:
        if self.in_place and relpath not in self._size:  # a file nothing was written to: often right already
            st = self._existing(relpath)
            if st is not None and st.st_size == size and st.st_mode & 0o7777 == self.mode:
                self.written.add(relpath)
                self._sized.add(relpath)
                return
        fd = self._fd(relpath)
        if self._size[relpath] != size:  # rewritten pages within a file of the right size leave it so
            os.ftruncate(fd, size)
            self._size[relpath] = size
        self._sized.add(relpath)

    def write_small(self, relpath: str, data: bytes) -> None:
        _write_small(self.target / relpath, data, self.mode)
        self.written.add(relpath)

    def close_all(self) -> None:
        for relpath, fd in self.fds.items():
            end = self._end.get(relpath, 0)
            if self.in_place and relpath not in self._sized and self._size[relpath] != end:
                os.ftruncate(fd, end)  # what an O_TRUNC open would have left
                self._size[relpath] = end
            os.close(fd)
        self.fds.clear()


def _sweep(target: Path, keep: set[str]) -> int:
    """Delete everything under target that is not in keep (relative paths) or above it; returns the count.
    Symbolic links are deleted or kept, never followed."""
    keep = set(keep)
    for path in list(keep):
        while (path := os.path.dirname(path)) and path not in keep:
            keep.add(path)
    gone = 0
    stack = [(str(target), "")]
    while stack:
        where, rel = stack.pop()
        with os.scandir(where) as entries:
            listed = list(entries)
        for e in listed:
            is_dir = e.is_dir(follow_symlinks=False)
            if rel + e.name in keep:
                if is_dir:
                    stack.append((e.path, rel + e.name + "/"))
                continue
            if is_dir:
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            gone += 1
    return gone


def rel_path(spc: int, db: int, rel: int, fork: int, segno: int) -> str:
    """A relation fork segment's file, relative to the data directory."""
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


def restore_image(layer_paths: Sequence[str | os.PathLike[str]], target_dir: str | os.PathLike[str],
                  recycle: bool = False) -> dict:
    """Recreate the data directory of an image in ``target_dir``; returns its metadata.

    ``target_dir`` must be absent or empty - unless ``recycle``: then it may hold an old data
    directory (a stopped compute's), whose files are overwritten in place and whatever the image
    does not have is deleted, so the result is the same tree as a restore into an empty
    directory. On some disks creating a file costs a millisecond of kernel time while rewriting
    one costs microseconds, and a data directory has about a thousand files.
    """
    target = Path(target_dir)
    readers = _open_image(layer_paths)
    try:
        meta = load_page_meta(readers)
        relseg = meta["relseg_size"]
        if not recycle and target.exists() and any(target.iterdir()):
            raise InvalidInput(f"target directory {target} is not empty")
        target.mkdir(parents=True, exist_ok=True)
        members = extract_aux_tar(_get(readers, AUX_FILES_KEY), target)
        file_mode = meta["file_mode"]
        out = _FileWriter(target, file_mode, in_place=recycle)
        try:
            for r in readers:
                _restore_layer(r, out, relseg)
        finally:
            out.close_all()
        for rel in meta["empty_segments"]:
            out.write_small(rel, b"")
        if recycle:
            _sweep(target, out.written | members)
        os.chmod(target, meta["dir_mode"])
        return meta
    finally:
        for r in readers:
            r.close()


def _page_runs(values: ImageValues, relseg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Classify a layer's keys column-wise: (kind of each row, page position in its file, run starts, run ends).

    A run is a stretch of rows that are consecutive pages of one file (relation segment or SLRU
    segment), so it goes out with one write.
    """
    f1, f2, f3, f4, f5, f6 = key_fields(values.keys)
    size = f6 == SIZE_MARKER
    rel = (f1 == REL_PREFIX) & (f4 != 0)
    slru = (f1 == SLRU_PREFIX) & (f3 == 1)
    kind = np.full(len(f1), _OTHER, dtype=np.int8)
    kind[rel & ~size] = _REL_PAGE
    kind[rel & size] = _REL_SIZE
    kind[slru & ~size] = _SLRU_PAGE
    kind[slru & size] = _SLRU_SIZE
    relmap = (f1 == REL_PREFIX) & (f4 == 0) & (f5 == 0) & (f6 == 0) & ((f2 != 0) | (f3 != 0))
    kind[relmap] = _RELMAP
    page = (kind == _REL_PAGE) | (kind == _SLRU_PAGE)
    segno = np.where(kind == _REL_PAGE, f6 // relseg, 0)
    pos = np.where(kind == _REL_PAGE, f6 % relseg, f6).astype(np.int64)
    starts = page.copy()
    if len(page) > 1:
        same_fork = np.all(values.keys[1:, :14] == values.keys[:-1, :14], axis=1)  # or the same SLRU segment
        starts[1:] &= ~(page[:-1] & same_fork & (segno[1:] == segno[:-1]) & (pos[1:] == pos[:-1] + 1))
    breaks = np.flatnonzero(starts | ~page)
    run_starts = np.flatnonzero(starts)
    after = np.searchsorted(breaks, run_starts, side="right")
    run_ends = np.append(breaks, len(page))[after]
    return kind, pos, run_starts, run_ends


def _restore_layer(r: ImageLayerReader, out: _FileWriter, relseg: int) -> None:
    """Write one layer's values to their files: a run of pages with one write, sizes, relmaps, pg_control."""
    values = r.read_all(scratch_name="image-restore")
    kind, pos, run_starts, run_ends = _page_runs(values, relseg)
    pages = (kind == _REL_PAGE) | (kind == _SLRU_PAGE)
    if np.any(values.length[pages] != BLCKSZ):
        bad = int(np.flatnonzero(pages & (values.length != BLCKSZ))[0])
        raise CorruptData(f"{r.path}: page {values.key(bad)} is {int(values.length[bad])} bytes, not {BLCKSZ}")
    run_end = dict(zip(run_starts.tolist(), run_ends.tolist(), strict=True))
    for i in sorted([*run_starts.tolist(), *np.flatnonzero(~pages).tolist()]):
        k = int(kind[i])
        key = values.key(i)
        if k in (_REL_PAGE, _SLRU_PAGE):
            end = run_end[i]
            relpath = (rel_path(*key.rel_tag(), key.field6 // relseg) if k == _REL_PAGE
                       else _slru_path(key.field2, key.field4))
            start = int(values.off[i])
            out.write(relpath, int(pos[i]) * BLCKSZ, values.buf[start:start + (end - i) * BLCKSZ])
        else:
            write_non_page(out, key, values.value(i), relseg, r.path)


def extract_aux_tar(aux: bytes, target: Path) -> set[str]:
    """The image's files that are not pages (config files, PG_VERSION, empty directories), from its aux tar;
    returns their normalised paths."""
    return write_aux(aux_entries(aux), target)


class AuxEntry(NamedTuple):
    name: str  # normalised, relative
    mode: int
    data: bytes | None  # None: a directory


def aux_entries(aux: bytes) -> tuple[AuxEntry, ...] | bytes:
    """The aux tar's directories and files, parsed once (an image's manifest keeps them) - or the tar itself
    when it holds anything else (a link, a path out of the directory), for tarfile's data filter to judge."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(aux), mode="r:") as tar:
        for m in tar.getmembers():
            name = os.path.normpath(m.name)
            if os.path.isabs(name) or name == ".." or name.startswith("../") or not (m.isdir() or m.isreg()):
                return aux
            out.append(AuxEntry(name, m.mode & 0o7777, tar.extractfile(m).read() if m.isreg() else None))
    return tuple(out)


def write_aux(entries: tuple[AuxEntry, ...] | bytes, target: Path) -> set[str]:
    """Write the aux files (`aux_entries`) with their modes: what tarfile's extraction did, without its ~6 ms
    of Python per start for 36 members (file times are not restored: nothing reads them)."""
    if isinstance(entries, bytes):
        with tarfile.open(fileobj=io.BytesIO(entries), mode="r:") as tar:
            tar.extractall(target, filter="data")
            members = tar.getmembers()
        for member in members:  # the data filter ignores directory modes of existing dirs only
            os.chmod(target / member.name, member.mode & 0o7777)
        return {os.path.normpath(m.name) for m in members}
    root = str(target)
    for e in entries:  # parents come before their files and subdirectories (create.py's order)
        path = os.path.join(root, e.name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) != (e.data is None)):
            shutil.rmtree(path) if stat.S_ISDIR(st.st_mode) else os.unlink(path)  # another kind of file
            st = None
        if e.data is None:
            if st is None:
                os.makedirs(path, e.mode, exist_ok=True)
            os.chmod(path, e.mode)
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, e.mode)
        except FileNotFoundError:  # its directory is missing (not in the tar)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, e.mode)
        try:
            os.fchmod(fd, e.mode)
            view = memoryview(e.data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return {e.name for e in entries}


def write_non_page(out: _FileWriter, key: Key, value: bytes, relseg: int, where: str) -> list[str]:
    """An image value that is not a page: a fork's or SLRU segment's size, a relation map, pg_control (the
    image's own metadata keys are skipped). Returns the relation segment files it sized."""
    sized: list[str] = []
    if key.is_rel_size():
        spc, db, rel, fork = key.rel_tag()
        (nblocks,) = _U32.unpack(value)
        for segno in range(max(1, -(-nblocks // relseg))):
            sized.append(rel_path(spc, db, rel, fork, segno))
            out.set_size(sized[-1], min(relseg, nblocks - segno * relseg) * BLCKSZ)
        out.close_all()  # a fork is complete: release its descriptors
    elif key.is_slru_seg_size():
        (npages,) = _U32.unpack(value)
        out.set_size(_slru_path(key.field2, key.field4), npages * BLCKSZ)
        out.close_all()
    elif key.is_relmap():
        out.write_small(_relmap_path(key.field2, key.field3), value)
    elif key.is_controlfile():
        out.write_small("global/pg_control", value)
    elif key not in (IMAGE_META_KEY, AUX_FILES_KEY):
        raise CorruptData(f"{where}: unexpected key {key} in an image")
    return sized


def _write_small(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


__all__ = ["image_info_from_layers", "read_image_meta", "rel_path", "restore_image"]
