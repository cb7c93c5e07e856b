"""Rebuild: turn a stopped compute's data directory into an image's files by rewriting only what differs.

pg_rewind's idea, driven by the layer map instead of by reading two directories. The directory ran on a
history that passes through the image's point; after that point it changed exactly the pages whose keys
the WAL it wrote touched - the caller collects them from the delta layers along that history - and
nothing else, *provided* the computes logged every page a hint bit changed (`wal_log_hints = on`) and the
first compute that ran in the directory since it was last made from an image started at or after this
image's point (so no unlogged hint landed on a page written before it; warm starts carry that first start
LSN over in the directory's record). Those
pages are rewritten from the image; so are the pages the WAL does not track (the free-space map and the
visibility map forks, both small), every SLRU segment, relation map and pg_control; relation files are cut
or grown to the image's sizes, pages past the directory's old end are written, and files the image does
not have are deleted. The result is the tree `restore.restore_image` would write into an empty directory,
without writing the pages that are already right - which, for a database much larger than its recent
changes, is nearly all of them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from neonctl.engine.failpoints import failpoint
from neonctl.engine.pageserver.images.image_set import BLCKSZ
from neonctl.engine.pageserver.images.restore import (
    _FileWriter,
    _load_meta,
    _open_image,
    _slru_path,
    _sweep,
    extract_aux_files,
    rel_path,
    restore_image,
    write_non_page,
)
from neonctl.engine.pageserver.key import REL_PREFIX, SIZE_MARKER, Key
from neonctl.engine.pageserver.key_columns import key_fields
from neonctl.errors import CorruptData

FSM_FORK, VM_FORK = 1, 2  # not tracked page by page in the WAL: always rewritten (they are small)


def changed_rows(changed: set[Key]) -> np.ndarray:
    """Keys as the sorted S18 array the rebuild matches image rows against."""
    return np.array(sorted(k.to_bytes() for k in changed), dtype="S18")


def rebuild_from_image(layer_paths, target: Path, changed: np.ndarray) -> dict:
    """Rewrite `target` (a stopped compute's directory) into the image's files; `changed` are the sorted S18
    keys of the pages to rewrite (what the directory's history changed since the image, minus the pages the
    replay rewrites whole: `replay_inits.py`). Returns the image's metadata plus `pages_written`, `pages_kept`
    and `timings`."""
    t0 = time.perf_counter()
    readers = _open_image(layer_paths)
    written = kept = 0
    try:
        meta = _load_meta(readers)
        if meta["blcksz"] != BLCKSZ:
            raise CorruptData(f"image has {meta['blcksz']}-byte pages; neonctl handles {BLCKSZ}")
        relseg = meta["relseg_size"]
        members = extract_aux_files(readers, target)
        t1 = time.perf_counter()
        out = _FileWriter(target, meta["file_mode"], in_place=True)
        present: set[str] = set()
        old_size: dict[str, int] = {}

        def size_now(relpath: str) -> int:
            if relpath not in old_size:
                try:
                    old_size[relpath] = os.stat(target / relpath).st_size // BLCKSZ
                except FileNotFoundError:
                    old_size[relpath] = 0
            return old_size[relpath]

        try:
            for r in readers:
                w, k = _rebuild_layer(r, out, relseg, changed, size_now, present)
                written, kept = written + w, kept + k
                failpoint("ps-rebuild-midway")
        finally:
            out.close_all()
        for rel in meta["empty_segments"]:
            out.write_small(rel, b"")
        t2 = time.perf_counter()
        _sweep(target, out.written | present | {os.path.normpath(m.name) for m in members})
        os.chmod(target, meta["dir_mode"])
        timings = {"aux": t1 - t0, "pages": t2 - t1, "sweep": time.perf_counter() - t2}
        return {**meta, "timings": timings, "pages_written": written, "pages_kept": kept}
    finally:
        for r in readers:
            r.close()


def _rebuild_layer(r, out: _FileWriter, relseg: int, changed_rows: np.ndarray, size_now, present: set[str]
                   ) -> tuple[int, int]:
    """One image layer: its keys classified column-wise from the index alone, then only the values that must
    be written are read. Returns (pages written, pages left as they were)."""
    keys, offsets = r.key_array()
    f1, f2, f3, f4, f5, f6 = key_fields(keys)
    size = f6 == SIZE_MARKER
    rel = (f1 == REL_PREFIX) & (f4 != 0)
    page = rel & ~size
    rows = np.flatnonzero(page)
    relpaths = {}  # (spc, db, rel, fork, segno) -> path
    need = np.zeros(len(keys), dtype=bool)
    if len(rows):
        need[rows] = np.isin(keys[rows].view("S18").ravel(), changed_rows) | (f5[rows] == FSM_FORK) | (
            f5[rows] == VM_FORK)
        segno = f6[rows] // relseg
        tags = np.stack([f2[rows], f3[rows], f4[rows], f5[rows].astype(np.uint32), segno], axis=1)
        uniq, inverse = group_rows(tags)
        old_blocks = np.empty(len(uniq), dtype=np.int64)
        for i, (spc, db, relno, fork, seg) in enumerate(uniq.tolist()):
            path = rel_path(spc, db, relno, fork, seg)
            relpaths[i] = path
            present.add(path)
            old_blocks[i] = size_now(path)
        beyond = (f6[rows] % relseg).astype(np.int64) >= old_blocks[inverse]
        need[rows] |= beyond
        file_of_row = np.empty(len(keys), dtype=np.int64)
        file_of_row[rows] = inverse
    written = int(need[rows].sum()) if len(rows) else 0
    for i in np.flatnonzero(need | ~page).tolist():  # pages to write, and every non-page key
        value = r.value_at(int(offsets[i]))
        if page[i]:
            out.write(relpaths[int(file_of_row[i])], int(f6[i] % relseg) * BLCKSZ, np.frombuffer(value, dtype=np.uint8))
            continue
        key = Key.from_bytes(keys[i].tobytes())
        if key.is_slru_block():
            out.write(_slru_path(key.field2, key.field4), key.field6 * BLCKSZ, np.frombuffer(value, dtype=np.uint8))
        else:
            present.update(write_non_page(out, key, value, relseg, r.path))
    return written, len(rows) - written


def group_rows(tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each row's distinct row) of a 2-D array, like ``np.unique(axis=0,
    return_inverse=True)``. An image layer's keys come sorted, so its (file) rows are sorted too and equal
    rows are adjacent: one pass finds them, where np.unique would sort the whole key array again (the
    largest part of a rebuild's time on a big database). Unsorted input falls back to np.unique."""
    if len(tags) == 0:
        return tags, np.empty(0, dtype=np.int64)
    starts = np.empty(len(tags), dtype=bool)
    starts[0] = True
    np.any(tags[1:] != tags[:-1], axis=1, out=starts[1:])
    uniq = tags[starts]
    a, b = uniq[:-1], uniq[1:]
    first = np.argmax(a != b, axis=1)  # the first column where neighbours differ
    idx = np.arange(len(first))
    if not np.all(b[idx, first] > a[idx, first]):
        u, inv = np.unique(tags, axis=0, return_inverse=True)
        return u, inv.ravel()
    return uniq, np.cumsum(starts) - 1


def verify_against_restore(layer_paths, target: Path, scratch: Path, left: dict[str, set[int]] | None = None
                           ) -> None:
    """The oracle (on when NEONCTL_VERIFY_REBUILD is set, as in the tests): restore the image the full way
    into `scratch` and require the rebuilt tree to be identical to it, file by file and byte by byte -
    except the pages `left` to the replay ({file: block numbers in it}), which the caller proves are
    rewritten whole by the replay (`replay_inits.check_replay_inits`). CorruptData names the first files
    that differ."""
    shutil.rmtree(scratch, ignore_errors=True)
    left = left or {}
    try:
        restore_image(layer_paths, scratch)
        ours, theirs = _tree(target), _tree(scratch)
        diff = sorted(set(ours) ^ set(theirs))
        for rel in sorted(set(ours) & set(theirs)):
            if ours[rel] != theirs[rel]:
                diff.append(rel)
                continue
            a, b = (target / rel).read_bytes(), (scratch / rel).read_bytes()
            if a != b and not _same_but(a, b, left.get(rel, ())):
                diff.append(rel)
        if diff:
            raise CorruptData(f"incremental rebuild differs from a full restore in {len(diff)} file(s): "
                              f"{', '.join(diff[:5])}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _same_but(a: bytes, b: bytes, blocks) -> bool:
    """Equal files but for the given blocks."""
    x, y = bytearray(a), bytearray(b)
    for blk in blocks:
        x[blk * BLCKSZ:(blk + 1) * BLCKSZ] = y[blk * BLCKSZ:(blk + 1) * BLCKSZ]
    return x == y


def left_pages(keys: np.ndarray, relseg: int) -> dict[str, set[int]]:
    """{relation segment file: block numbers in it} of S18 page keys (for the oracle's report)."""
    out: dict[str, set[int]] = {}
    for raw in keys.tolist():
        k = Key.from_bytes(raw.ljust(18, b"\0"))  # numpy drops an S18 key's trailing NULs
        if k.field1 != REL_PREFIX or k.field4 == 0:
            continue
        out.setdefault(rel_path(k.field2, k.field3, k.field4, k.field5, k.field6 // relseg), set()).add(
            k.field6 % relseg)
    return out


def _tree(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.stat().st_size
    return out
