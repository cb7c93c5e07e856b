"""The explorer's questions, as SQL over the views: a branch's layers, a layer's details, chart series.

Each is a plain function of a `MetadataDB`, shared by the TUI and the tests (and printable: the
SQL here is what a user would type into `neonctl layers query`).
"""

from __future__ import annotations

from neonctl.engine.explorer.views import MetadataDB
from neonctl.engine.lsn import format_lsn

LAYER_ORDER = "ORDER BY key_start, lsn_start, name"


def branch_layers(db: MetadataDB, branch: str) -> list[dict]:
    """Every layer a read on the branch can visit: its own and its ancestors' below the branch point."""
    return db.rows(f"SELECT * FROM branch_layers WHERE branch = ? {LAYER_ORDER}", [branch])


def lsn_markers(db: MetadataDB, branch: str) -> list[tuple[int, str, str]]:
    """(lsn, label, kind) for the LSN axis: the branch point, children's branch points, PITR, GC, head."""
    t = db.rows("SELECT * FROM timelines WHERE branch = ?", [branch])
    if not t:
        return []
    t = t[0]
    out = [(t["head"], "head", "head")]
    if t["branch_point"] is not None:
        out.append((t["branch_point"], f"from {t['parent']}", "branch_point"))
    for c in db.rows("SELECT branch, branch_point FROM timelines WHERE parent = ? ORDER BY branch_point, branch",
                     [branch]):
        out.append((c["branch_point"], f"⑂ {c['branch']}", "child"))
    if t["pitr_cutoff"] is not None and t["pitr_cutoff"] > t["start_lsn"]:
        out.append((t["pitr_cutoff"], "PITR", "pitr"))
    if t["gc_cutoff"]:
        out.append((t["gc_cutoff"], "GC", "gc"))
    if t["gc_planned_cutoff"] and t["gc_planned_cutoff"] != t["gc_cutoff"]:
        out.append((t["gc_planned_cutoff"], "GC next", "gc_next"))
    return out


def relations_for(db: MetadataDB, branch: str) -> list[dict]:
    """Relation names for the branch: its own compute's, else the nearest ancestor's (a child starts
    with its parent's catalog)."""
    return db.rows(relations_sql() + " ORDER BY r.database NULLS FIRST, r.name", [branch, branch])


def commit_time_at(db: MetadataDB, branch: str, lsn: int) -> str | None:
    """Time of the last commit at or before the LSN in the branch's history (ancestors included)."""
    _, rows = db.query(
        "SELECT max(c.commit_time) FROM commits c JOIN lineage g ON c.branch = g.ancestor AND g.branch = ?"
        " WHERE c.lsn <= ? AND c.lsn <= g.below", [branch, lsn])
    v = rows[0][0] if rows else None
    return None if v is None else v.strftime("%Y-%m-%d %H:%M:%S UTC")


def layer_details(db: MetadataDB, branch: str, layer: dict) -> dict:
    """Everything the `layers` view has on one layer, the relations it covers by name and the commit
    times at its LSN bounds."""
    rels = db.rows(
        "SELECT name, relkind, rel FROM (" + relations_sql() + ") r WHERE r.key_start < ? AND ? < r.key_end"
        " ORDER BY r.key_start", [branch, branch, layer["key_end"], layer["key_start"]])
    return {**{k: v for k, v in layer.items() if k not in ("depth",)},
            "lsn_range": f"{format_lsn(layer['lsn_start'])}..{format_lsn(layer['lsn_end'])}",
            "time_start": commit_time_at(db, branch, layer["lsn_start"]),
            "time_end": commit_time_at(db, branch, layer["lsn_end"]),
            "relations": rels}


def relations_sql() -> str:
    return ("SELECT r.* FROM relations r JOIN lineage g ON r.branch = g.ancestor AND g.branch = ?"
            " WHERE g.depth = (SELECT min(g2.depth) FROM lineage g2 JOIN relations r2 ON r2.branch = g2.ancestor"
            "                  WHERE g2.branch = ?)")


WAL_PER_MINUTE = """
WITH m AS (SELECT branch, date_trunc('minute', commit_time) AS minute, max(lsn) AS lsn FROM commits GROUP BY ALL)
SELECT m.branch, m.minute,
       (m.lsn - coalesce(lag(m.lsn) OVER (PARTITION BY m.branch ORDER BY m.minute), t.start_lsn))::BIGINT AS wal_bytes
FROM m JOIN timelines t USING (branch) ORDER BY m.branch, m.minute
"""

BYTES_BY_KIND = """
SELECT CASE WHEN kind = 'image' THEN 'image' ELSE 'delta L' || level END AS class,
       count(*) AS layers, sum(file_size)::BIGINT AS bytes
FROM layers GROUP BY ALL ORDER BY class
"""


def wal_per_minute(db: MetadataDB) -> dict[str, list[tuple]]:
    """branch -> [(minute, WAL bytes written that minute)] from the commit log's LSNs."""
    out: dict[str, list[tuple]] = {}
    for r in db.rows(WAL_PER_MINUTE):
        out.setdefault(r["branch"], []).append((r["minute"], r["wal_bytes"]))
    return out


def bytes_by_kind(db: MetadataDB) -> list[dict]:
    return db.rows(BYTES_BY_KIND)


def read_amplification(db: MetadataDB, branch: str) -> list[dict]:
    return db.rows("SELECT * FROM read_amplification WHERE branch = ? ORDER BY key_start", [branch])
