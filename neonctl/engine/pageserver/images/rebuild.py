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
changes, is nearly all of them. Where the image keeps which page and file is its manifest's
(`image_manifest.py`, read once per image), so no start reads the image's whole index.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from neonctl.engine.failpoints import failpoint
from neonctl.engine.pageserver.images.image_manifest import manifest_of
from neonctl.engine.pageserver.images.image_set import BLCKSZ
from neonctl.engine.pageserver.images.restore import (
    _FileWriter,
    _sweep,
    rel_path,
    restore_image,
    write_aux,
)
from neonctl.engine.pageserver.key import REL_PREFIX, Key
from neonctl.engine.pageserver.storage_layer.image_layer import ImageLayerReader
from neonctl.errors import CorruptData


def changed_rows(changed: set[Key]) -> np.ndarray:
    """Keys as the sorted S18 array the rebuild matches image rows against."""
    return np.array(sorted(k.to_bytes() for k in changed), dtype="S18")


def rebuild_from_image(layer_paths, target: Path, changed: np.ndarray) -> dict:
    """Rewrite `target` (a stopped compute's directory) into the image's files; `changed` are the sorted S18
    keys of the pages to rewrite (what the directory's history changed since the image, minus the pages the
    replay rewrites whole: `replay_inits.py`). Returns the image's metadata plus `pages_written`, `pages_kept`
    and `timings`.

    Where the image's pages and files are comes from its manifest (`image_manifest.py`, read once per image), so
    the cost is the pages written plus one stat per file: the changed pages, the pages past the end of a file the
    directory has shorter, and the pages every rebuild writes (FSM, VM, SLRU), relation maps and pg_control."""
    t0 = time.perf_counter()
    m = manifest_of(layer_paths)
    t1 = time.perf_counter()
    members = write_aux(m.aux, target)
    t2 = time.perf_counter()
    out = _FileWriter(target, m.meta["file_mode"], in_place=True)
    old_blocks = np.array([out.existing_size(f) // BLCKSZ for f in m.files], dtype=np.int64)
    pick = m.block >= old_blocks[m.file_of]  # past the directory's end of its file
    if len(changed) and len(m.keys):
        at = np.minimum(np.searchsorted(m.keys, changed), len(m.keys) - 1)
        pick[at[m.keys[at] == changed]] = True
    rows = np.flatnonzero(pick)
    pages: dict[str, list[tuple[int, bytes]]] = {}
    for f, off, page in m.always:
        pages.setdefault(f, []).append((off, page))
    readers: dict[int, ImageLayerReader] = {}
    try:
        for i, li, off in zip(rows.tolist(), m.layer[rows].tolist(), m.offset[rows].tolist(), strict=True):
            r = readers.get(li) or readers.setdefault(li, ImageLayerReader(m.paths[li]))
            pages.setdefault(m.files[m.file_of[i]], []).append((int(m.block[i]) * BLCKSZ, r.value_at(off)))
    finally:
        for r in readers.values():
            r.close()
    t3 = time.perf_counter()
    try:
        for n, (f, size) in enumerate(m.sizes):
            for off, page in pages.pop(f, ()):
                out.write(f, off, np.frombuffer(page, dtype=np.uint8))
            out.set_size(f, size)
            out.close_all()
            if n == len(m.sizes) // 2:
                failpoint("ps-rebuild-midway")
        for f, writes in pages.items():  # a page whose file the image does not size (none in practice)
            for off, page in writes:
                out.write(f, off, np.frombuffer(page, dtype=np.uint8))
    finally:
        out.close_all()
    for f, data in m.smalls:
        out.write_small(f, data)
    for rel in m.meta["empty_segments"]:
        out.write_small(rel, b"")
    t4 = time.perf_counter()
    _sweep(target, out.written | m.present | members)
    os.chmod(target, m.meta["dir_mode"])
    timings = {"manifest": t1 - t0, "aux": t2 - t1, "read": t3 - t2, "write": t4 - t3,
               "sweep": time.perf_counter() - t4}
    return {**m.meta, "timings": timings, "pages_written": len(rows), "pages_kept": len(m.keys) - len(rows)}


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
