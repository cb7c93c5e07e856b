"""Turning scanned WAL into (key, LSN, value) entries - what delta layers are made of - column-wise.

Each block a record references becomes an entry under that block's key: the
block's full-page image (``FPI``, as the record stores it) when Postgres
applies one - the page is initialised by it - else the whole record
(``WAL_RECORD``, with Postgres' will_init flag; Neon too copies a
multi-block record once per page). Relation sizes ride along under rel-size keys,
which sort right after a relation's blocks: they grow when a record touches a
block past the known end and shrink on smgr truncate.

Everything is computed over a ``RecordBatch`` (the columnar output of
``record_scan``) with numpy and small JIT loops: no Python object per record.
The rare smgr truncate records go through the full Python decoder, in LSN
order between the vectorised stretches around them.
"""

from __future__ import annotations

import numpy as np

from neonctl.engine.jit import jit
from neonctl.engine.pageserver import value
from neonctl.engine.pageserver.key import SIZE_MARKER
from neonctl.engine.pageserver.key_columns import group_by_relation, rel_block_rows
from neonctl.engine.pageserver.storage_layer.delta_layer import DeltaEntries
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.record_scan import (
    BLK_APPLY_IMAGE,
    BLK_HAS_IMAGE,
    BLK_WILL_INIT,
    RecordBatch,
)
from neonctl.engine.wal.rmgr_records import SmgrTruncate, parse_smgr

MAIN_FORK, FSM_FORK, VM_FORK = 0, 1, 2
RM_SMGR_ID = 2
XLOG_SMGR_TRUNCATE = 0x20
RelTag = tuple[int, int, int, int]


@jit
def _gather_fpis(data, img_off, img_len, info, hole_off, hole_len, out, out_off):
    """Copy each image behind its FPI header (bimg_info u8, hole offset u16, hole length u16, little-endian)."""
    pos = 0
    for i in range(img_off.shape[0]):
        out_off[i] = pos
        out[pos] = info[i]
        out[pos + 1] = hole_off[i] & 0xFF
        out[pos + 2] = hole_off[i] >> 8
        out[pos + 3] = hole_len[i] & 0xFF
        out[pos + 4] = hole_len[i] >> 8
        pos += 5
        out[pos:pos + img_len[i]] = data[img_off[i]:img_off[i] + img_len[i]]
        pos += img_len[i]


@jit
def _size_growth(gid, nblocks, current, out):
    """Per block ref in LSN order: the new size where it extends its relation, else -1."""
    for i in range(gid.shape[0]):
        g = gid[i]
        if nblocks[i] > current[g]:
            current[g] = nblocks[i]
            out[i] = nblocks[i]
        else:
            out[i] = -1


def _size_entries(tags: list[RelTag], sizes: list[int], lsns: list[int]) -> DeltaEntries:
    n = len(tags)
    t = np.array(tags, dtype=np.int64).reshape(n, 4)
    rows = rel_block_rows(t[:, 0], t[:, 1], t[:, 2], t[:, 3], np.full(n, SIZE_MARKER, dtype=np.uint32),
                          np.array(lsns, dtype=np.uint64))
    src = np.array(sizes, dtype="<u4").view(np.uint8)
    return DeltaEntries(rows, np.ones(n, dtype=bool), src, np.arange(n, dtype=np.int64) * 4,
                        np.full(n, 4, dtype=np.int64), np.full(n, value.IMAGE, dtype=np.int16))


class WalIngest:
    """Per-timeline decoding state: the relation sizes seen so far."""

    def __init__(self, pg_version: int):
        self.pg_version = pg_version
        self.rel_sizes: dict[RelTag, int] = {}

    def batch_entries(self, batch: RecordBatch, first: int = 0, last: int | None = None) -> list[DeltaEntries]:
        """Entries for records ``first..last`` of the batch, in LSN order per key (chunks to append in order)."""
        n = len(batch) if last is None else last
        if first >= n:
            return []
        trunc = np.flatnonzero((batch.rmid[first:n] == RM_SMGR_ID)
                               & (batch.info[first:n] & 0xF0 == XLOG_SMGR_TRUNCATE)) + first
        out: list[DeltaEntries] = []
        start = first
        for t in trunc.tolist():
            out.extend(self._stretch(batch, start, t + 1))  # the truncate record's own blocks first
            sizes = self._truncate(batch, t)
            if sizes:
                out.append(sizes)
            start = t + 1
        out.extend(self._stretch(batch, start, n))
        return [c for c in out if len(c)]

    def _stretch(self, batch: RecordBatch, lo: int, hi: int) -> list[DeltaEntries]:
        """Block and rel-size entries of records [lo, hi), none of which truncates a relation."""
        b0, b1 = np.searchsorted(batch.blk_rec, [lo, hi])
        if b1 <= b0:
            return []
        rec = batch.blk_rec[b0:b1]
        flags = batch.blk_flags[b0:b1]
        lsn = batch.lsn[rec]
        spc, db, rel = batch.blk_spc[b0:b1], batch.blk_db[b0:b1], batch.blk_rel[b0:b1]
        fork, blkno = batch.blk_fork[b0:b1], batch.blk_no[b0:b1]
        rows = rel_block_rows(spc, db, rel, fork, blkno, lsn)
        fpi = (flags & (BLK_HAS_IMAGE | BLK_APPLY_IMAGE)) == (BLK_HAS_IMAGE | BLK_APPLY_IMAGE)
        will_init = fpi | ((flags & BLK_WILL_INIT) != 0)
        tag = np.where(fpi, value.FPI, value.WAL_RECORD).astype(np.int16)
        off = batch.off[rec].astype(np.int64)
        length = batch.tot_len[rec].astype(np.int64)
        src = batch.data
        at = np.flatnonzero(fpi)
        if len(at):
            # a page image is stored alone, not with the rest of its record: gather the images into a
            # buffer addressed after the record bytes, so the chunk keeps its LSN order
            j = at + b0
            img_len = batch.blk_img_len[j]
            images = np.empty(int(img_len.sum()) + 5 * len(j), dtype=np.uint8)
            fpi_off = np.empty(len(j), dtype=np.int64)
            _gather_fpis(batch.data, batch.blk_img_off[j], img_len, batch.blk_bimg_info[j], batch.blk_hole_off[j],
                         batch.blk_hole_len[j], images, fpi_off)
            src = (batch.data, images)  # addressed as one buffer: the images' offsets follow the records'
            off[at] = fpi_off + len(batch.data)
            length[at] = img_len + 5
        out = [DeltaEntries(rows, will_init, src, off, length, tag)]
        # relation sizes: group block refs by relation fork (the key prefix), extend in LSN order
        gid, firsts = group_by_relation(rows)
        tags: list[RelTag] = [(int(spc[f]), int(db[f]), int(rel[f]), int(fork[f])) for f in firsts.tolist()]
        current = np.array([self.rel_sizes.get(t, 0) for t in tags], dtype=np.int64)
        grown = np.empty(len(rows), dtype=np.int64)
        _size_growth(gid, blkno.astype(np.int64) + 1, current, grown)
        for g, t in enumerate(tags):
            self.rel_sizes[t] = int(current[g])
        at = np.flatnonzero(grown >= 0)
        if len(at):
            out.append(_size_entries([tags[i] for i in gid[at].tolist()], grown[at].tolist(), lsn[at].tolist()))
        return out

    def _truncate(self, batch: RecordBatch, i: int) -> DeltaEntries | None:
        """Size entries for an smgr truncate record (decoded the slow way: they are rare)."""
        rec = decode_record(batch.raw(i), self.pg_version)
        smgr = parse_smgr(rec)
        if not isinstance(smgr, SmgrTruncate):
            return None
        r = smgr.rel
        tags, sizes = [], []
        forks = [(MAIN_FORK, smgr.truncates_heap), (FSM_FORK, smgr.truncates_fsm), (VM_FORK, smgr.truncates_vm)]
        for fork, hit in forks:
            tag = (r.spc, r.db, r.rel, fork)
            if hit and tag in self.rel_sizes:
                # FSM/VM truncation points are derived from the heap's; record the heap's exactly
                n = smgr.blkno if fork == MAIN_FORK else min(self.rel_sizes[tag], smgr.blkno)
                self.rel_sizes[tag] = n
                tags.append(tag)
                sizes.append(n)
        return _size_entries(tags, sizes, [rec.lsn] * len(tags)) if tags else None
