"""Keys as numpy rows: building index keys for many values at once, taking them apart, sorting them.

A delta layer's index key is the 18-byte ``Key`` followed by the LSN, both
big-endian, so byte order is (key, LSN) order. Ingest and compaction handle a
million of them per 100 MB of WAL; comparing 26-byte rows is slow even in
numpy (~0.5 s per million), but the first 14 bytes (namespace, tablespace,
database, relation, fork) take few distinct values. So rows are grouped by
that prefix in a hash table, the few prefixes are ranked, and a stable
integer sort on (rank, block) puts rows in key order while keeping the order
rows came in (ascending LSN) for equal keys.

Images work on runs instead: the pages of a segment file lie under consecutive
keys (same prefix, consecutive block numbers), so they are built from each run's
first key and taken apart into field columns without a ``Key`` per page.
"""

from __future__ import annotations

import numpy as np

from neonctl.engine.jit import jit
from neonctl.engine.pageserver.key import KEY_SIZE

INDEX_KEY_SIZE = KEY_SIZE + 8
_PREFIX = 14  # field1..field5; field6 (block number) is the last 4 bytes of the key


@jit
def _fill_rel_rows(spc, db, rel, fork, blkno, lsn, rows):
    for i in range(rows.shape[0]):
        r = rows[i]
        r[0] = 0
        for k in range(4):
            sh = 24 - 8 * k
            r[1 + k] = (spc[i] >> sh) & 0xFF
            r[5 + k] = (db[i] >> sh) & 0xFF
            r[9 + k] = (rel[i] >> sh) & 0xFF
            r[14 + k] = (blkno[i] >> sh) & 0xFF
        r[13] = fork[i]
        v = np.uint64(lsn[i])
        for k in range(8):
            r[18 + k] = (v >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)


@jit
def _fill_runs(firsts, counts, rows):
    k = 0
    for r in range(firsts.shape[0]):
        f = firsts[r]
        blk = (np.int64(f[14]) << 24) | (np.int64(f[15]) << 16) | (np.int64(f[16]) << 8) | np.int64(f[17])
        for j in range(counts[r]):
            row = rows[k]
            for c in range(14):
                row[c] = f[c]
            b = blk + j
            row[14] = (b >> 24) & 0xFF
            row[15] = (b >> 16) & 0xFF
            row[16] = (b >> 8) & 0xFF
            row[17] = b & 0xFF
            k += 1


def key_runs(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Keys (n, 18) of runs: ``counts[r]`` keys from ``firsts[r]`` (18-byte rows) on, field6 counting up."""
    firsts = np.ascontiguousarray(firsts, dtype=np.uint8).reshape(-1, KEY_SIZE)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    last = (firsts[:, 14:].copy().view(">u4").ravel().astype(np.int64) + counts - 1) if len(counts) else counts
    if len(counts) and (int(counts.min()) < 0 or int(last.max()) > 0xFFFFFFFF):
        raise ValueError("a key run goes past block number 0xFFFFFFFF or has a negative length")
    rows = np.empty((int(counts.sum()), KEY_SIZE), dtype=np.uint8)
    _fill_runs(firsts, counts, rows)
    return rows


def key_fields(rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """The six fields of 18-byte key rows as columns: field1, field5 uint8; field2-4, field6 uint32."""
    u32 = [np.ascontiguousarray(rows[:, at:at + 4]).view(">u4").ravel().astype(np.uint32) for at in (1, 5, 9, 14)]
    return rows[:, 0].copy(), u32[0], u32[1], u32[2], rows[:, 13].copy(), u32[3]


def rel_block_rows(spc: np.ndarray, db: np.ndarray, rel: np.ndarray, fork: np.ndarray, blkno: np.ndarray,
                   lsn: np.ndarray) -> np.ndarray:
    """Index keys (n, 26) of relation blocks (or sizes, with blkno 0xFFFFFFFF) at the given LSNs."""
    rows = np.empty((len(spc), INDEX_KEY_SIZE), dtype=np.uint8)
    _fill_rel_rows(np.asarray(spc, np.uint32), np.asarray(db, np.uint32), np.asarray(rel, np.uint32),
                   np.asarray(fork, np.uint8), np.asarray(blkno, np.uint32), np.asarray(lsn, np.uint64), rows)
    return rows


@jit
def _group_prefixes(rows, plen, table, gid, firsts):
    """Assign each row a group id by its first ``plen`` bytes; returns the group count, -1 if the table fills."""
    mask = table.shape[0] - 1
    groups = 0
    for i in range(rows.shape[0]):
        h = np.uint64(0x9E3779B97F4A7C15)
        for c in range(0, plen - 7, 8):  # eight bytes per multiply (LLVM merges the byte loads)
            w = np.uint64(0)
            for k in range(8):
                w = (w << np.uint64(8)) | np.uint64(rows[i, c + k])
            h = (h ^ w) * np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(29)
        for c in range(plen - plen % 8, plen):
            h = (h ^ np.uint64(rows[i, c])) * np.uint64(1099511628211)
        slot = np.int64(h & np.uint64(mask))
        while True:
            g = table[slot]
            if g < 0:
                if groups * 2 >= table.shape[0]:
                    return -1
                table[slot] = groups
                firsts[groups] = i
                gid[i] = groups
                groups += 1
                break
            f = firsts[g]
            same = True
            for c in range(plen):
                if rows[f, c] != rows[i, c]:
                    same = False
                    break
            if same:
                gid[i] = g
                break
            slot = (slot + 1) & mask
    return groups


def group_by_relation(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group rows by key prefix (relation fork, SLRU, ...): (group id per row, first row of each group)."""
    n = len(rows)
    size = min(1 << 14, 1 << max(6, (2 * n).bit_length()))
    gid = np.empty(n, dtype=np.int64)
    while True:
        table = np.full(size, -1, dtype=np.int64)
        firsts = np.empty(size // 2 + 1, dtype=np.int64)
        groups = _group_prefixes(rows, _PREFIX, table, gid, firsts)
        if groups >= 0:
            return gid, firsts[:groups]
        size *= 4


def key_order(rows: np.ndarray) -> np.ndarray:
    """Permutation that sorts index-key rows by key, stable (rows of one key keep their order)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    gid, firsts = group_by_relation(rows)
    groups = len(firsts)
    prefixes = [rows[firsts[g], :_PREFIX].tobytes() for g in range(groups)]
    rank = np.empty(groups, dtype=np.uint64)
    rank[sorted(range(groups), key=prefixes.__getitem__)] = np.arange(groups, dtype=np.uint64)
    block = rows[:, _PREFIX:KEY_SIZE].copy().view(">u4").ravel().astype(np.uint64)
    return np.argsort(rank[gid] << np.uint64(32) | block, kind="stable")


@jit
def _last_of_runs(rows, will_init, keep):
    """Mark the last row of each run of identical rows; OR ``will_init`` along the run into it."""
    n, width = rows.shape
    for i in range(n):
        keep[i] = True
        if i + 1 < n:
            same = True
            for c in range(width):
                if rows[i, c] != rows[i + 1, c]:
                    same = False
                    break
            if same:
                keep[i] = False
                if will_init[i]:
                    will_init[i + 1] = True


def dedupe_sorted(rows: np.ndarray, will_init: np.ndarray) -> np.ndarray:
    """Rows to keep of sorted rows where the same (key, LSN) repeats (a record naming one page twice).

    The last value wins, and it initialises the page if any of the repeats did. ``will_init`` is updated.
    """
    keep = np.empty(len(rows), dtype=np.bool_)
    _last_of_runs(rows, will_init, keep)
    return keep
