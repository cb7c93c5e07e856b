"""Schema diff between two points of history (Neon's `branches schema-diff`).

Each point is dumped with `pg_dump --schema-only` from a compute that shows
exactly that point: the branch's own running compute for a bare branch, a
running time-travel endpoint at that LSN, or else a temporary read-only
time-travel endpoint that is stopped again afterwards. Databases are diffed
one by one (difflib unified diff, base -> compare).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from neonctl.engine.branch_ops import parse_source
from neonctl.engine.compute.endpoint import EndpointState, stop_endpoint
from neonctl.engine.compute.time_travel import find_running, start_time_travel
from neonctl.engine.project import Project
from neonctl.engine.timepoint import TimePoint, parse_ref
from neonctl.errors import NotFound

# Lines that differ between two dumps of the same schema: pg_dump's per-run \restrict key (17.6+, 16.10+,
# 15.14+) and version banners.
_NOISE = re.compile(r"^(\\restrict |\\unrestrict |-- Dumped (from database|by pg_dump) version )")

COLORS = {"header": "\x1b[33m", "added": "\x1b[32m", "removed": "\x1b[31m", "section": "\x1b[35m"}
RESET = "\x1b[0m"


@dataclass
class SchemaDiff:
    base: str  # endpoint names: `main`, `dev@0/16B3748`
    compare: str
    databases: list[dict] = field(default_factory=list)  # {"database", "diff"}

    @property
    def identical(self) -> bool:
        return not any(d["diff"] for d in self.databases)

    @property
    def text(self) -> str:
        return "".join(d["diff"] for d in self.databases)


def resolve_points(project: Project, base: str | None, compare: str | None) -> tuple[TimePoint, TimePoint]:
    """Base: `BRANCH[@LSN|@TIME]` (default: the default branch). Compare: relative to the base branch,
    `^parent[@P]` (the default), `^self@P` or `BRANCH[@P]`."""
    bp = parse_ref(base) if base else TimePoint(None)
    bp = TimePoint(bp.branch or project.config.default_branch, bp.lsn, bp.timestamp)
    b = project.branch(bp.branch)
    cp = parse_source(project, b, compare or "^parent", allow_own_head=True)
    return bp, cp


def dump_schema(project: Project, st: EndpointState, db: str) -> str:
    runtime = project.runtime()
    out = runtime.run([runtime.bin("pg_dump"), "--schema-only", "-h", st.socket_dir, "-p", str(st.port),
                       "-U", "postgres", "-d", db], timeout=120).stdout
    return "".join(line for line in out.splitlines(keepends=True) if not _NOISE.match(line))


def list_databases(st: EndpointState) -> list[str]:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(st.admin_dsn, autocommit=True, connect_timeout=10) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]


def schema_diff(project: Project, base: str | None, compare: str | None, db: str | None = None,
                progress=lambda msg: None) -> SchemaDiff:
    bp, cp = resolve_points(project, base, compare)
    temps: list[EndpointState] = []

    def endpoint_for(point: TimePoint) -> EndpointState:
        st = find_running(project, point)
        if st is None:
            st, started = start_time_travel(project, point, reuse=True, progress=progress)
            if started:
                temps.append(st)
        return st

    try:
        a = endpoint_for(bp)
        b = endpoint_for(cp)
        dbs_a, dbs_b = list_databases(a), list_databases(b)
        if db is not None:
            if db not in dbs_a and db not in dbs_b:
                raise NotFound(f"database {db!r} exists neither on {a.name} nor on {b.name}",
                               hint=f"databases: {', '.join(sorted(set(dbs_a) | set(dbs_b)))}")
            dbs = [db]
        else:
            dbs = sorted(set(dbs_a) | set(dbs_b))
        result = SchemaDiff(base=a.name, compare=b.name)
        for d in dbs:
            sa = dump_schema(project, a, d) if d in dbs_a else ""
            sb = dump_schema(project, b, d) if d in dbs_b else ""
            diff = "".join(difflib.unified_diff(sa.splitlines(keepends=True), sb.splitlines(keepends=True),
                                                fromfile=f"{a.name}/{d}", tofile=f"{b.name}/{d}"))
            result.databases.append({"database": d, "diff": diff})
        return result
    finally:
        for st in temps:
            try:
                stop_endpoint(project, st.name, immediate=True)
            except Exception as e:  # noqa: BLE001 - report, but keep the diff (or the real error)
                progress(f"WARNING: could not stop temporary endpoint {st.name}: {e}")


def colorize(diff: str) -> str:
    out = []
    for line in diff.splitlines(keepends=True):
        body, nl = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        if line.startswith(("+++", "---")):
            kind = "header"
        elif line.startswith("+"):
            kind = "added"
        elif line.startswith("-"):
            kind = "removed"
        elif line.startswith("@@"):
            kind = "section"
        else:
            out.append(line)
            continue
        out.append(f"{COLORS[kind]}{body}{RESET}{nl}")
    return "".join(out)
