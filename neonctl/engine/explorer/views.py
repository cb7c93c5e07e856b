"""DuckDB views over a storage snapshot: the SQL surface of `neonctl layers query` and the TUI.

One in-memory DuckDB database per snapshot. The base views are tables filled column-wise from the
snapshot's rows (numpy arrays registered with DuckDB, one INSERT per view); the derived views
(`branch_layers`, `read_amplification`) are SQL over them. `VIEWS` documents every column: it is
the reference `docs/explorer.md` is checked against. LSNs are UBIGINT; `lsn(x)` prints one as
`X/Y` and `lsn_int('X/Y')` parses one. Times are TIMESTAMP in UTC.

A connection is shared by threads through cursors (`query` takes one per call), so the TUI's
workers can query while a refresh builds the next database.
"""

from __future__ import annotations

import threading
import time

from neonctl.engine.explorer.metadata import StorageSnapshot
from neonctl.errors import InvalidInput

# view -> [(column, DuckDB type, meaning)]
VIEWS: dict[str, list[tuple[str, str, str]]] = {
    "layers": [
        ("branch", "VARCHAR", "branch whose timeline owns the layer file"),
        ("timeline_id", "VARCHAR", "that timeline's id"),
        ("name", "VARCHAR", "layer file name (key range and LSN range)"),
        ("kind", "VARCHAR", "'delta' or 'image'"),
        ("level", "INTEGER", "0 for L0 deltas, 1 for compacted deltas, -1 for images"),
        ("key_start", "VARCHAR", "first key covered (36 hex digits)"),
        ("key_end", "VARCHAR", "first key after the range (exclusive)"),
        ("start_space", "VARCHAR", "key space of key_start: rel, dbdir, slru, twophase, meta, max"),
        ("start_rel", "VARCHAR", "relation of key_start as 'spc/db/relfilenode' (NULL outside relations)"),
        ("start_fork", "VARCHAR", "fork of key_start: main, fsm, vm, init"),
        ("start_block", "BIGINT", "block of key_start (NULL for a fork's size entry)"),
        ("end_space", "VARCHAR", "key space of key_end"),
        ("end_rel", "VARCHAR", "relation of key_end (exclusive bound)"),
        ("end_fork", "VARCHAR", "fork of key_end"),
        ("end_block", "BIGINT", "block of key_end"),
        ("lsn_start", "UBIGINT", "first LSN covered"),
        ("lsn_end", "UBIGINT", "LSN after the range (an image at L has lsn_end = L + 1)"),
        ("file_size", "BIGINT", "bytes on disk"),
        ("num_values", "BIGINT", "values (page versions, records, sizes) stored"),
        ("compression", "VARCHAR", "'zstd' (image pages, when smaller) or 'none' (delta values)"),
    ],
    "timelines": [
        ("branch", "VARCHAR", "branch name"),
        ("timeline_id", "VARCHAR", "its timeline id"),
        ("parent", "VARCHAR", "parent branch (NULL for the root)"),
        ("ancestor_timeline", "VARCHAR", "the parent's timeline id"),
        ("branch_point", "UBIGINT", "LSN on the parent the branch starts from (NULL for the root)"),
        ("start_lsn", "UBIGINT", "first LSN of the timeline's own WAL"),
        ("head", "UBIGINT", "last record LSN (live from the pageserver when it runs)"),
        ("disk_consistent_lsn", "UBIGINT", "LSN up to which layers are on disk"),
        ("initdb_lsn", "UBIGINT", "end of the initdb image's checkpoint"),
        ("created_at", "TIMESTAMP", "when the timeline was created"),
        ("gc_cutoff", "UBIGINT", "cutoff of the last GC, persisted in the index (0: never collected)"),
        ("gc_planned_cutoff", "UBIGINT", "the cutoff GC would use now (NULL while the pageserver is stopped)"),
        ("pitr_cutoff", "UBIGINT", "start of the PITR window: newest LSN older than pitr_interval"),
        ("space_cutoff", "UBIGINT", "head minus gc_horizon"),
        ("pitr_interval_s", "DOUBLE", "the pageserver's pitr_interval (seconds)"),
        ("gc_horizon", "BIGINT", "the pageserver's gc_horizon (bytes of WAL)"),
        ("is_default", "BOOLEAN", "the project's default branch"),
    ],
    "relations": [
        ("branch", "VARCHAR", "branch whose running compute named it (as of its head)"),
        ("database", "VARCHAR", "database (NULL for shared catalogs)"),
        ("name", "VARCHAR", "relation name as regclass prints it"),
        ("relkind", "VARCHAR", "pg_class.relkind: r table, i index, t TOAST, S sequence, m matview"),
        ("spc", "BIGINT", "tablespace oid"),
        ("db", "BIGINT", "database oid (0 for shared catalogs)"),
        ("relfilenode", "BIGINT", "relfilenode"),
        ("rel", "VARCHAR", "'spc/db/relfilenode', as in layers.start_rel"),
        ("key_start", "VARCHAR", "first key of the relation (all forks)"),
        ("key_end", "VARCHAR", "first key after it"),
    ],
    "commits": [
        ("branch", "VARCHAR", "branch"),
        ("timeline_id", "VARCHAR", "timeline"),
        ("lsn", "UBIGINT", "end LSN of the commit record"),
        ("commit_time", "TIMESTAMP", "commit timestamp (UTC)"),
    ],
    "wal": [
        ("branch", "VARCHAR", "branch"),
        ("timeline_id", "VARCHAR", "timeline"),
        ("segment", "VARCHAR", "segment file name"),
        ("start_lsn", "UBIGINT", "first LSN of the segment"),
        ("end_lsn", "UBIGINT", "LSN after the segment"),
        ("file_bytes", "BIGINT", "size of the file on disk"),
        ("wal_bytes", "BIGINT", "bytes of the timeline's WAL in it, up to the head"),
    ],
    "gc": [
        ("branch", "VARCHAR", "branch"),
        ("timeline_id", "VARCHAR", "timeline"),
        ("run", "VARCHAR", "'last': removed by the last GC that removed anything; 'planned': what GC would remove now"),
        ("ran_at", "TIMESTAMP", "when the last GC ran (NULL for planned rows)"),
        ("kind", "VARCHAR", "'image', 'delta' or 'wal'"),
        ("file", "VARCHAR", "layer file name, or 'segment N'"),
        ("bytes", "BIGINT", "bytes freed, or that it would free"),
        ("cutoff", "UBIGINT", "the cutoff that GC used, or would use"),
    ],
    "daemons": [
        ("name", "VARCHAR", "broker, skN, pageserver, proxy"),
        ("state", "VARCHAR", "running, stopped, unhealthy, ..."),
        ("pid", "BIGINT", "process id (NULL when stopped)"),
        ("address", "VARCHAR", "host:port"),
    ],
}

DERIVED: dict[str, list[tuple[str, str, str]]] = {
    "branch_layers": [
        ("branch", "VARCHAR", "branch reading the layer"),
        ("inherited", "BOOLEAN", "true when the layer belongs to an ancestor (read below the branch point)"),
        ("owner", "VARCHAR", "branch owning the file"),
        ("depth", "INTEGER", "0 own, 1 parent, 2 grandparent, ..."),
        ("...", "", "every column of layers except branch"),
    ],
    "read_amplification": [
        ("branch", "VARCHAR", "branch"),
        ("key_start", "VARCHAR", "start of a key range between layer boundaries"),
        ("key_end", "VARCHAR", "its end (NULL for the last)"),
        ("start_rel", "VARCHAR", "relation at key_start"),
        ("deltas", "BIGINT", "delta layers a read there visits (above the newest image)"),
        ("read_amplification", "BIGINT", "layers a read visits: deltas + 1 if an image covers it"),
    ],
}

_DERIVED_SQL = """
CREATE MACRO lsn(x) AS printf('%X/%X', (x::UBIGINT >> 32), (x::UBIGINT & 4294967295));
CREATE MACRO lsn_int(t) AS ((('0x' || split_part(t, '/', 1))::UBIGINT << 32)
                            + ('0x' || split_part(t, '/', 2))::UBIGINT);
CREATE TABLE lineage AS
  WITH RECURSIVE up(branch, ancestor, below, depth) AS (
      SELECT branch, branch, 18446744073709551615::UBIGINT, 0 FROM timelines
    UNION ALL
      SELECT up.branch, t.parent, least(up.below, t.branch_point), up.depth + 1
      FROM up JOIN timelines t ON t.branch = up.ancestor WHERE t.parent IS NOT NULL)
  SELECT * FROM up;
CREATE VIEW branch_layers AS
  SELECT g.branch, g.depth > 0 AS inherited, l.branch AS owner, g.depth, l.* EXCLUDE (branch)
  FROM lineage g JOIN layers l ON l.branch = g.ancestor
  WHERE l.lsn_start < g.below OR (l.kind = 'image' AND l.lsn_start = g.below);
CREATE VIEW read_amplification AS
  WITH bounds AS (SELECT DISTINCT branch, key_start AS k, start_rel FROM branch_layers),
  img AS (
    SELECT b.branch, b.k, b.start_rel, max(i.lsn_start) AS img_lsn
    FROM bounds b LEFT JOIN branch_layers i
      ON i.branch = b.branch AND i.kind = 'image' AND i.key_start <= b.k AND b.k < i.key_end
    GROUP BY ALL)
  SELECT n.branch, n.k AS key_start, lead(n.k) OVER (PARTITION BY n.branch ORDER BY n.k) AS key_end,
         n.start_rel,
         count(l.name) FILTER (WHERE l.kind = 'delta' AND l.lsn_end > coalesce(n.img_lsn, 0)) AS deltas,
         count(l.name) FILTER (WHERE l.kind = 'delta' AND l.lsn_end > coalesce(n.img_lsn, 0))
           + (CASE WHEN n.img_lsn IS NULL THEN 0 ELSE 1 END) AS read_amplification
  FROM img n LEFT JOIN branch_layers l
    ON l.branch = n.branch AND l.key_start <= n.k AND n.k < l.key_end
  GROUP BY n.branch, n.k, n.start_rel, n.img_lsn;
"""


def _column(rows: list[dict], name: str, typ: str, view: str):
    import numpy as np

    if view == "commits" and name == "commit_time":
        return np.array([r["time"] for r in rows], dtype="float64")
    if typ == "TIMESTAMP":
        return np.array([r[name] for r in rows], dtype="float64")
    vals = [r.get(name) for r in rows]
    if typ in ("VARCHAR", "UBIGINT", "BIGINT", "INTEGER") and any(v is None for v in vals) or typ == "VARCHAR":
        return np.array(vals, dtype=object)
    if typ == "BOOLEAN":
        return np.array(vals, dtype=bool)
    if typ == "DOUBLE":
        return np.array(vals, dtype="float64")
    return np.array(vals, dtype="uint64" if typ == "UBIGINT" else "int64")


class MetadataDB:
    """The views of one snapshot in an in-memory DuckDB database."""

    def __init__(self, snapshot: StorageSnapshot):
        import duckdb

        self.snapshot = snapshot
        self.con = duckdb.connect(":memory:")
        self._lock = threading.Lock()
        for view, cols in VIEWS.items():
            self.con.execute(f"CREATE TABLE {view} ({', '.join(f'{c} {t}' for c, t, _ in cols)})")
            rows = getattr(snapshot, view)
            if not rows:
                continue
            frame = {c: _column(rows, c, t, view) for c, t, _ in cols}
            self.con.register("_frame", frame)
            select = ", ".join(f"make_timestamp(({c} * 1000000)::BIGINT)" if t == "TIMESTAMP" else f"{c}::{t}"
                               for c, t, _ in cols)
            self.con.execute(f"INSERT INTO {view} SELECT {select} FROM _frame")
            self.con.unregister("_frame")
        self.con.execute(_DERIVED_SQL)

    def query(self, sql: str, params: list | dict | None = None) -> tuple[list[str], list[tuple]]:
        """Run one statement; returns (column names, rows). Bad SQL raises InvalidInput (one line)."""
        import duckdb

        cur = self.con.cursor()
        try:
            res = cur.execute(sql, params) if params is not None else cur.execute(sql)
            if res.description is None:
                return [], []
            return [d[0] for d in res.description], res.fetchall()
        except duckdb.Error as e:
            raise InvalidInput(f"query failed: {_one_line(e)}") from None
        finally:
            cur.close()

    def rows(self, sql: str, params: list | dict | None = None) -> list[dict]:
        cols, rows = self.query(sql, params)
        return [dict(zip(cols, r, strict=False)) for r in rows]

    def close(self) -> None:
        self.con.close()


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    # DuckDB: "Parser Error: syntax error at or near ..." then a LINE/caret block; keep the message
    return text[0] if text else e.__class__.__name__


def timed_query(db: MetadataDB, sql: str) -> tuple[list[str], list[tuple], float]:
    t = time.perf_counter()
    cols, rows = db.query(sql)
    return cols, rows, (time.perf_counter() - t) * 1000
