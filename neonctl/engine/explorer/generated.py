"""Synthetic storage snapshots of any size, for benchmarks and layout tests.

A generated catalog looks like a busy pageserver's: one root branch and a child, an initdb image
over the whole key space, L1 deltas partitioning the key space of a few hundred relations over
successive compaction rounds, newer images, a tail of L0 deltas and commits every few hundred KiB
of WAL. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from itertools import pairwise

from neonctl.engine.explorer.keys import relation_key_range
from neonctl.engine.explorer.metadata import StorageSnapshot, layer_row

_MAX_KEY = "F" * 36
_MIN_KEY = "0" * 36


def _name(ks: str, ke: str, a: int, b: int | None) -> str:
    return f"{ks}-{ke}__{a:016X}" + (f"-{b:016X}" if b is not None else "")


def generated_snapshot(n_layers: int = 10_000, relations: int = 300, seed: int = 1) -> StorageSnapshot:
    rnd = random.Random(seed)
    root, child = "0" * 31 + "1", "0" * 31 + "2"
    snap = StorageSnapshot("generated", 1_700_000_000.0, "main")
    rels = [(1663, 5, 16384 + 8 * i) for i in range(relations)]
    rel_rows = []
    for i, (spc, db, node) in enumerate(rels):
        ks, ke = relation_key_range(spc, db, node)
        rel_rows.append({"branch": "main", "database": "postgres", "name": f"t{i:04d}", "relkind": "r",
                         "spc": spc, "db": db, "relfilenode": node, "rel": f"{spc}/{db}/{node}",
                         "key_start": ks, "key_end": ke})
    snap.relations = rel_rows
    base = 0x1_0000_0000
    lsn = base
    layers: list[tuple[str, dict]] = []

    def add(branch: str, tid: str, kind: str, level: int, ks: str, ke: str, a: int, b: int) -> None:
        d = {"name": _name(ks, ke, a, None if kind == "image" else b), "kind": kind, "level": level,
             "key_start": ks, "key_end": ke, "lsn_start": a, "lsn_end": b,
             "file_size": rnd.randint(64 << 10, 32 << 20), "num_values": rnd.randint(100, 200_000)}
        layers.append((branch, layer_row(branch, tid, d)))

    add("main", root, "image", -1, _MIN_KEY, _MAX_KEY, lsn, lsn + 1)
    bounds = sorted({rel_rows[i]["key_start"] for i in range(relations)})
    rounds = 0
    while len(layers) < n_layers * 0.85:
        span = rnd.randint(8, 64) << 20
        # one compaction round: L1s partition the key space over [lsn, lsn + span)
        parts = sorted(rnd.sample(bounds, min(len(bounds) - 1, rnd.randint(20, 120))))
        edges = [_MIN_KEY, *parts, _MAX_KEY]
        for ks, ke in pairwise(edges):
            add("main", root, "delta", 1, ks, ke, lsn, lsn + span)
        lsn += span
        rounds += 1
        if rounds % 12 == 0:
            add("main", root, "image", -1, _MIN_KEY, _MAX_KEY, lsn, lsn + 1)
    branch_point = lsn - (lsn - base) // 3
    while len(layers) < n_layers:
        span = rnd.randint(1, 16) << 20
        branch = "dev" if len(layers) % 2 else "main"
        tid = child if branch == "dev" else root
        start = max(lsn if branch == "main" else branch_point, max(
            (r["lsn_end"] for b, r in layers if b == branch and r["level"] == 0), default=0))
        ks = rnd.choice(bounds[: len(bounds) // 2])
        add(branch, tid, "delta", 0, ks, _MAX_KEY, start, start + span)
    main_head = max(r["lsn_end"] for _, r in layers if r["branch"] == "main")
    dev_head = max([branch_point] + [r["lsn_end"] for _, r in layers if r["branch"] == "dev"])
    snap.layers = [r for _, r in layers]
    for branch, tid, parent, bp, head in (("main", root, None, None, main_head), ("dev", child, "main", branch_point,
                                                                                  dev_head)):
        start = bp or base
        snap.timelines.append({
            "branch": branch, "timeline_id": tid, "parent": parent, "ancestor_timeline": root if parent else None,
            "branch_point": bp, "start_lsn": start, "head": head, "disk_consistent_lsn": head,
            "initdb_lsn": base, "created_at": 1_700_000_000.0, "gc_cutoff": start + (head - start) // 4,
            "gc_planned_cutoff": start + (head - start) // 3, "pitr_cutoff": start + (head - start) // 2,
            "space_cutoff": head - (64 << 20), "pitr_interval_s": 604800.0, "gc_horizon": 64 << 20,
            "is_default": parent is None})
        t = 1_700_000_000.0
        for c in range(start, head, 1 << 20):
            t += rnd.uniform(0.05, 3.0)
            snap.commits.append({"branch": branch, "timeline_id": tid, "lsn": c, "time": t})
    snap.daemons = [{"name": n, "state": "running", "pid": 100 + i, "address": f"127.0.0.1:{5000 + i}"}
                    for i, n in enumerate(["broker", "sk1", "pageserver", "proxy"])]
    return snap
