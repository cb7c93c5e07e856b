"""Pages the WAL replay rewrites whole: a rebuild need not write them first.

A directory materialised from an image crash-recovers from the image's redo point R to the target X.
For a page whose *first* reference in the WAL (R, X] carries a full-page image that redo applies, or
is marked WILL_INIT, redo overwrites the page without reading it (PostgreSQL's own torn-page
protection: XLogReadBufferForRedo restores an applied image, and a WILL_INIT block is zeroed, whatever
the page held). Whatever a stopped directory has on disk for such a page is therefore irrelevant, and
an incremental rebuild (`rebuild.py`) can leave it as it is instead of rewriting it from the image.

With `full_page_writes` on, that is nearly every page the WAL after R touches, which is most of what a
busy branch changed: rewriting them was most of the time of `branch restore ^self@T` and of a reset
while the parent writes. The set is read from the WAL itself, never assumed: a page whose first
reference after R is an ordinary record (it needs the image's bytes) is rewritten as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from neonctl.engine.pageserver.key import REL_PREFIX
from neonctl.engine.pageserver.key_columns import rel_block_rows
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import WalStreamDecoder
from neonctl.engine.wal.record_scan import BLK_APPLY_IMAGE, BLK_HAS_IMAGE, BLK_WILL_INIT, scan_wal
from neonctl.errors import CorruptData

log = logging.getLogger("pageserver.replay_inits")
KEY_LEN = 18  # the page's key, without the LSN of the index row
CHUNK = 64 << 20  # WAL scanned per read: bounds the memory of a long replay range

ReadWal = Callable[[int, int], bytes]


def first_refs_from_wal(read_wal: ReadWal, lo: int, hi: int, seg_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per relation page referenced in the WAL [lo, hi) (lo a record start, hi a record end): (keys as sorted
    S18, whether its first reference initialises it - an applied page image, or WILL_INIT)."""
    keys: list[np.ndarray] = []
    inits: list[np.ndarray] = []
    pos, prev = lo, None
    t_read = t_scan = 0.0
    while pos < hi:
        t0 = time.perf_counter()
        buf = read_wal(pos, min(CHUNK, hi - pos))
        t1 = time.perf_counter()
        batch = scan_wal(buf, pos, seg_size, prev_lsn=prev, verify_crc=False)  # checked at ingest
        t_read, t_scan = t_read + t1 - t0, t_scan + time.perf_counter() - t1
        if batch.error is not None:
            raise CorruptData(f"WAL at {pos:X} cannot be scanned for the replay's page images: {batch.error}")
        if len(batch.blk_rec):
            rows = rel_block_rows(batch.blk_spc, batch.blk_db, batch.blk_rel, batch.blk_fork, batch.blk_no,
                                  batch.lsn[batch.blk_rec])
            keys.append(np.ascontiguousarray(rows[:, :KEY_LEN]).view(f"S{KEY_LEN}").ravel())
            f = batch.blk_flags
            inits.append(((f & BLK_WILL_INIT) != 0)
                         | ((f & (BLK_HAS_IMAGE | BLK_APPLY_IMAGE)) == (BLK_HAS_IMAGE | BLK_APPLY_IMAGE)))
        if len(batch) == 0 or batch.end_lsn <= pos:
            break  # nothing complete in a whole chunk: the range ends inside a record
        prev = int(batch.lsn[-1])
        pos = batch.end_lsn
    if not keys:
        return np.empty(0, dtype=f"S{KEY_LEN}"), np.empty(0, dtype=bool)
    all_keys, all_inits = np.concatenate(keys), np.concatenate(inits)
    uniq, first = np.unique(all_keys, return_index=True)  # the index of each key's first reference
    if hi - lo > CHUNK:
        log.info("replay page images from %d WAL bytes: read %.0f ms, scan %.0f ms", hi - lo, t_read * 1000,
                 t_scan * 1000)
    return uniq, all_inits[first]


def pages_replay_inits(read_wal: ReadWal, redo_lsn: int, lsn: int, seg_size: int) -> np.ndarray:
    """The keys (sorted, dtype S18) of the relation pages whose first reference in the WAL (redo_lsn, lsn]
    initialises the page (an applied page image, or WILL_INIT), all read from the WAL."""
    keys, inits = first_refs_from_wal(read_wal, redo_lsn, lsn, seg_size)
    return keys[inits]


def relation_pages(keys: np.ndarray) -> np.ndarray:
    """Which S18 keys are relation pages (not relation sizes, SLRU blocks or other non-page keys the layers
    also hold): the only keys a rebuild could leave to the replay."""
    b = np.ascontiguousarray(keys).view(np.uint8).reshape(-1, KEY_LEN)
    return (b[:, 0] == REL_PREFIX) & (b[:, 9:13] != 0).any(axis=1) & ~(b[:, 14:18] == 0xFF).all(axis=1)


def merge_first_refs(earlier: tuple[np.ndarray, np.ndarray], later: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The pages the replay rewrites whole, from the first references of two consecutive WAL ranges: a page
    referenced in the earlier range is decided there; one first referenced in the later range, there."""
    e_keys, e_init = earlier
    l_keys, l_init = later
    fresh = ~np.isin(l_keys, e_keys, assume_unique=True)
    return np.union1d(e_keys[e_init], l_keys[fresh & l_init & relation_pages(l_keys)])


def check_replay_inits(read_wal: ReadWal, redo_lsn: int, lsn: int, seg_size: int, skipped) -> None:
    """The oracle's side of the above, through the slow record decoder (a second implementation): every
    skipped page's first reference in (redo_lsn, lsn] must initialise it. CorruptData names one that does not."""
    want = {bytes(k).ljust(KEY_LEN, b"\0") for k in skipped}  # numpy drops trailing NULs
    if not want:
        return
    dec = WalStreamDecoder(redo_lsn, seg_size)
    dec.feed(read_wal(redo_lsn, lsn - redo_lsn))
    seen: set[bytes] = set()
    while (raw := dec.poll()) is not None and raw.end_lsn <= lsn:
        for b in decode_record(raw).blocks:
            rows = rel_block_rows(np.array([b.spc]), np.array([b.db]), np.array([b.rel]), np.array([b.forknum]),
                                  np.array([b.blkno]), np.array([0]))
            key = rows[0, :KEY_LEN].tobytes()
            if key in seen:
                continue
            seen.add(key)
            if key in want and not b.inits_page:
                raise CorruptData(f"a rebuild left page {key.hex()} to the replay, but its first record after the "
                                  f"redo point ({raw.lsn:X}) does not rewrite it whole")
    missing = want - seen
    if missing:
        raise CorruptData(f"a rebuild left {len(missing)} page(s) to the replay that no record after the redo "
                          f"point touches, e.g. {next(iter(missing)).hex()}")
