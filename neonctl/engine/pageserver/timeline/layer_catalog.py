"""Layer metadata in DuckDB: one table per project, kept in step with every index change.

The index file is the truth; this table is a queryable copy of it (kind, key
range, LSN range, size, record count per layer) so that `neonctl layers list`
and `layers stats` - counts, bytes and read amplification per key range - are
SQL rather than hand-written loops.
"""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb

from neonctl.engine.pageserver.timeline.layer_map import LayerDesc

SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    timeline_id VARCHAR, name VARCHAR, kind VARCHAR, level INTEGER,
    key_start VARCHAR, key_end VARCHAR, lsn_start UBIGINT, lsn_end UBIGINT,
    file_size BIGINT, num_values BIGINT,
    PRIMARY KEY (timeline_id, name)
)
"""

READ_AMP = """
WITH bounds AS (SELECT DISTINCT key_start AS k FROM layers WHERE timeline_id = $tl),
newest_image AS (
    SELECT b.k, coalesce(max(i.lsn_start), 0) AS img_lsn
    FROM bounds b LEFT JOIN layers i
      ON i.timeline_id = $tl AND i.kind = 'image' AND i.key_start <= b.k AND b.k < i.key_end
    GROUP BY b.k)
SELECT n.k AS range_start,
       count(l.name) FILTER (WHERE l.kind = 'delta' AND l.lsn_end > n.img_lsn)
         + (CASE WHEN n.img_lsn > 0 THEN 1 ELSE 0 END) AS read_amplification
FROM newest_image n LEFT JOIN layers l
  ON l.timeline_id = $tl AND l.key_start <= n.k AND n.k < l.key_end
GROUP BY n.k, n.img_lsn ORDER BY n.k
"""


class LayerCatalog:
    def __init__(self, path: Path):
        self.con = duckdb.connect(str(path))
        self.con.execute(SCHEMA)
        self.lock = threading.Lock()

    def sync(self, timeline_id: str, layers: list[LayerDesc]) -> None:
        with self.lock:
            cur = self.con.cursor()
            cur.execute("BEGIN")
            cur.execute("DELETE FROM layers WHERE timeline_id = ?", [timeline_id])
            if layers:
                cur.executemany("INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                    [timeline_id, d.name, d.kind, d.level, d.key_start, d.key_end, d.lsn_start, d.lsn_end,
                     d.file_size, d.num_values] for d in layers])
            cur.execute("COMMIT")

    def drop(self, timeline_id: str) -> None:
        with self.lock:
            self.con.cursor().execute("DELETE FROM layers WHERE timeline_id = ?", [timeline_id])

    def _rows(self, sql: str, params) -> list[dict]:
        with self.lock:
            cur = self.con.cursor()
            res = cur.execute(sql, params)
            cols = [c[0] for c in res.description]
            return [dict(zip(cols, r, strict=False)) for r in res.fetchall()]

    def list(self, timeline_id: str | None = None) -> list[dict]:
        if timeline_id:
            return self._rows("SELECT * FROM layers WHERE timeline_id = ? ORDER BY lsn_start, key_start, name",
                              [timeline_id])
        return self._rows("SELECT * FROM layers ORDER BY timeline_id, lsn_start, key_start, name", [])

    def stats(self, timeline_id: str) -> dict:
        totals = self._rows(
            "SELECT kind, level, count(*) AS layers, sum(file_size) AS bytes, sum(num_values) AS values"
            " FROM layers WHERE timeline_id = ? GROUP BY kind, level ORDER BY kind, level", [timeline_id])
        amp = self._rows(READ_AMP, {"tl": timeline_id})
        worst = max((r["read_amplification"] for r in amp), default=0)
        return {"totals": totals, "read_amplification": amp, "max_read_amplification": worst}
