"""Turning WAL records into (key, LSN, value) entries - what delta layers are made of.

Each block a record references becomes an entry under that block's key: the
restored full-page image when Postgres applies one (it initialises the page),
otherwise the whole record (Neon copies a multi-block record once per page).
Relation sizes ride along under rel-size keys, which sort right after a
relation's blocks: they grow when a record touches a block past the known
end and shrink on smgr truncate.
"""

from __future__ import annotations

from collections.abc import Iterator

from neonctl.engine.pageserver import value
from neonctl.engine.pageserver.key import Key, rel_block_key, rel_size_key
from neonctl.engine.wal.decoder import SmgrTruncate, decode_record, parse_smgr
from neonctl.engine.wal.reader import RawRecord

MAIN_FORK, FSM_FORK, VM_FORK = 0, 1, 2
RM_SMGR_ID = 2


class WalIngest:
    """Per-timeline decoding state: the relation sizes seen so far."""

    def __init__(self, pg_version: int):
        self.pg_version = pg_version
        self.rel_sizes: dict[tuple[int, int, int, int], int] = {}

    def entries(self, raw: RawRecord) -> Iterator[tuple[Key, int, bytes, bool]]:
        """(key, lsn, value, will_init) for every page the record touches, plus size changes."""
        rec = decode_record(raw, self.pg_version)
        lsn = raw.lsn
        record_value = None
        for blk in rec.blocks:
            key = rel_block_key(blk.spc, blk.db, blk.rel, blk.forknum, blk.blkno)
            if blk.has_image and blk.apply_image:
                yield key, lsn, value.image(blk.image), True
            else:
                if record_value is None:
                    record_value = value.wal_record(raw.data)
                yield key, lsn, record_value, blk.will_init
            tag = (blk.spc, blk.db, blk.rel, blk.forknum)
            if blk.blkno + 1 > self.rel_sizes.get(tag, 0):
                self.rel_sizes[tag] = blk.blkno + 1
                yield rel_size_key(*tag), lsn, value.rel_size(blk.blkno + 1), True
        if raw.rmid == RM_SMGR_ID:
            smgr = parse_smgr(rec)
            if isinstance(smgr, SmgrTruncate):
                r = smgr.rel
                forks = [(MAIN_FORK, smgr.truncates_heap), (FSM_FORK, smgr.truncates_fsm), (VM_FORK, smgr.truncates_vm)]
                for fork, hit in forks:
                    if hit and (r.spc, r.db, r.rel, fork) in self.rel_sizes:
                        # FSM/VM truncation points are derived from the heap's; record heap exactly
                        n = smgr.blkno if fork == MAIN_FORK else min(self.rel_sizes[(r.spc, r.db, r.rel, fork)], smgr.blkno)
                        self.rel_sizes[(r.spc, r.db, r.rel, fork)] = n
                        yield rel_size_key(r.spc, r.db, r.rel, fork), lsn, value.rel_size(n), True
