"""An image's manifest: what an incremental rebuild needs to know of an image, read once per image.

A rebuild (rebuild.py) writes few of an image's pages - those the stopped directory's history changed - but
it must know where every page of the image lies (to find those pages and the ones past the end of a file the
directory has shorter), every file and its size (to cut or grow the directory's files and delete what the image
lacks) and the values it writes every time (the free-space and visibility-map forks, SLRU segments, relation
maps, pg_control, the aux tar). Reading and classifying a 1 GB image's whole index for that took 60-150 ms of
every start. An image never changes, so the pageserver keeps the result of that pass for the last images it
rebuilt from: a rebuild then costs its changed pages plus a stat of each file.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neonctl.engine.pageserver.images.image_set import AUX_FILES_KEY, BLCKSZ, IMAGE_META_KEY
from neonctl.engine.pageserver.images.restore import (
    _U32,
    AuxEntry,
    _open_image,
    _relmap_path,
    _slru_path,
    aux_entries,
    load_page_meta,
    rel_path,
)
from neonctl.engine.pageserver.key import REL_PREFIX, SIZE_MARKER, Key
from neonctl.engine.pageserver.key_columns import key_fields
from neonctl.errors import CorruptData

FSM_FORK, VM_FORK = 1, 2  # not tracked page by page in the WAL: every rebuild rewrites them (they are small)
KEPT = 2  # manifests a pageserver keeps (the images it rebuilt from last)


@dataclass(frozen=True)
class ImageManifest:
    meta: dict
    paths: tuple[str, ...]  # the image's layer files, in key order
    keys: np.ndarray  # (n,) S18: every relation page key of the image, in key order
    layer: np.ndarray  # (n,) index into `paths` of the layer holding it
    offset: np.ndarray  # (n,) its blob offset in that layer
    block: np.ndarray  # (n,) its block number in its segment file
    file_of: np.ndarray  # (n,) index into `files` of its segment file
    files: tuple[str, ...]  # the relation segment files that have pages
    sizes: tuple[tuple[str, int], ...]  # every relation and SLRU segment file the image sizes, with its bytes
    always: tuple[tuple[str, int, bytes], ...]  # (file, byte offset, page): FSM, VM and SLRU pages
    smalls: tuple[tuple[str, bytes], ...]  # relation maps and pg_control
    aux: tuple[AuxEntry, ...] | bytes  # the aux tar's files (config, PG_VERSION) and directories (aux_entries)

    @property
    def present(self) -> set[str]:
        """Every file the image's pages and sizes name (the rest of a directory, aux files aside, goes)."""
        return {*self.files, *(p for p, _ in self.sizes)}


_cache: OrderedDict[tuple, ImageManifest] = OrderedDict()
_lock = threading.Lock()


def manifest_of(layer_paths: Sequence[str | os.PathLike[str]]) -> ImageManifest:
    """The manifest of the image made of these layer files: kept from an earlier call, or read now."""
    ident = tuple(sorted((str(p), os.stat(p).st_ino) for p in layer_paths))  # a layer file is never rewritten
    with _lock:
        found = _cache.get(ident)
        if found is not None:
            _cache.move_to_end(ident)
            return found
    made = read_manifest(layer_paths)
    with _lock:
        _cache[ident] = made
        while len(_cache) > KEPT:
            _cache.popitem(last=False)
    return made


def read_manifest(layer_paths: Sequence[str | os.PathLike[str]]) -> ImageManifest:
    """One pass over the image's indexes, and a read of each value every rebuild writes."""
    readers = _open_image(layer_paths)
    try:
        meta = load_page_meta(readers)
        relseg = meta["relseg_size"]
        parts: list[tuple] = []
        files: list[str] = []
        sizes: list[tuple[str, int]] = []
        always: list[tuple[str, int, bytes]] = []
        smalls: list[tuple[str, bytes]] = []
        aux: tuple[AuxEntry, ...] | bytes = b""
        for li, r in enumerate(readers):
            keys, offsets = r.key_array()
            f1, f2, f3, f4, f5, f6 = key_fields(keys)
            rel = (f1 == REL_PREFIX) & (f4 != 0)
            page = rel & (f6 != SIZE_MARKER)
            rows = np.flatnonzero(page)
            block = (f6[rows] % relseg).astype(np.int64)
            tags = np.stack([f2[rows], f3[rows], f4[rows], f5[rows].astype(np.uint32), f6[rows] // relseg], axis=1)
            uniq, inverse = group_rows(tags)
            first = len(files)
            files.extend(rel_path(spc, db, relno, fork, seg) for spc, db, relno, fork, seg in uniq.tolist())
            parts.append((keys[rows].view("S18").ravel(), np.full(len(rows), li, dtype=np.int16), offsets[rows],
                          block, inverse.astype(np.int64) + first))
            fork = f5[rows]
            for i in np.flatnonzero((fork == FSM_FORK) | (fork == VM_FORK)).tolist():
                always.append((files[first + int(inverse[i])], int(block[i]) * BLCKSZ,
                               r.value_at(int(offsets[rows[i]]))))
            for i in np.flatnonzero(~page).tolist():
                key = Key.from_bytes(keys[i].tobytes())
                value = r.value_at(int(offsets[i]))
                if key.is_rel_size():
                    spc, db, relno, fk = key.rel_tag()
                    (nblocks,) = _U32.unpack(value)
                    for segno in range(max(1, -(-nblocks // relseg))):
                        sizes.append((rel_path(spc, db, relno, fk, segno),
                                      min(relseg, nblocks - segno * relseg) * BLCKSZ))
                elif key.is_slru_block():
                    always.append((_slru_path(key.field2, key.field4), key.field6 * BLCKSZ, value))
                elif key.is_slru_seg_size():
                    (npages,) = _U32.unpack(value)
                    sizes.append((_slru_path(key.field2, key.field4), npages * BLCKSZ))
                elif key.is_relmap():
                    smalls.append((_relmap_path(key.field2, key.field3), value))
                elif key.is_controlfile():
                    smalls.append(("global/pg_control", value))
                elif key == AUX_FILES_KEY:
                    aux = aux_entries(value)
                elif key != IMAGE_META_KEY:
                    raise CorruptData(f"{r.path}: unexpected key {key} in an image")
        keys_, layer, offset, block, file_of = (np.concatenate(col) for col in zip(*parts, strict=True))
        return ImageManifest(meta=meta, paths=tuple(str(r.path) for r in readers), keys=keys_, layer=layer,
                             offset=offset, block=block, file_of=file_of, files=tuple(files), sizes=tuple(sizes),
                             always=tuple(always), smalls=tuple(smalls), aux=aux)
    finally:
        for r in readers:
            r.close()


def group_rows(tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each row's distinct row) of a 2-D array, like ``np.unique(axis=0,
    return_inverse=True)``. An image layer's keys come sorted, so its (file) rows are sorted too and equal
    rows are adjacent: one pass finds them, where np.unique would sort the whole key array again. Unsorted
    input falls back to np.unique."""
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


__all__ = ["ImageManifest", "group_rows", "manifest_of", "read_manifest"]
