"""`neonctl layers query`: SQL over a fresh snapshot's views, and the result as a table, JSON or CSV.

The snapshot asks running processes only for what the SQL names: relation names (a running
compute) when it mentions `relations`, GC's dry run (the pageserver) when it mentions `gc`; the
rest is read from the project's files, so queries work with the daemons stopped.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date, datetime
from decimal import Decimal

from neonctl.engine.explorer.metadata import MetadataLoader
from neonctl.engine.explorer.views import MetadataDB
from neonctl.engine.project import Project

FORMATS = ("table", "json", "csv")


def query_project(project: Project, sql: str) -> tuple[list[str], list[tuple]]:
    if not sql.strip():
        from neonctl.errors import InvalidInput

        raise InvalidInput("no SQL given", hint="neonctl layers query \"SELECT * FROM layers\" (or -f FILE)")
    words = set(re.findall(r"[a-z_]+", sql.lower()))
    snap = MetadataLoader(project, relations="relations" in words or "relations_for" in words,
                          gc="gc" in words).load()
    db = MetadataDB(snap)
    try:
        return db.query(sql)
    finally:
        db.close()


def _plain(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    return v


def render(columns: list[str], rows: list[tuple], fmt: str) -> str:
    """The result for stdout: an aligned table with the columns as named, JSON rows, or CSV."""
    if fmt == "json":
        return json.dumps(
            [{c: _plain(v) for c, v in zip(columns, r, strict=False)} for r in rows], indent=2, default=str
        )
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if v is None else _plain(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if not columns:
        return "(no result)"
    cells = [["" if v is None else str(_plain(v)) for v in r] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(vals):
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=False)).rstrip()

    out = [line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)]
    return "\n".join(out) + ("" if cells else "\n(no rows)")
