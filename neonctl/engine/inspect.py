"""Debug views users expect: layers of a branch, WAL records in an LSN range, a page's versions.

WAL is read straight from the pageserver's timeline directory (read-only,
through the timeline's ancestors); layer metadata and page versions come from
the pageserver, which owns the layer files and the DuckDB catalog.
"""

from __future__ import annotations

import struct

from neonctl.engine.compute.endpoint import running_endpoint
from neonctl.engine.explorer.metadata import load_snapshot
from neonctl.engine.explorer.views import MetadataDB
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.pageserver.key import rel_block_key
from neonctl.engine.pageserver.timeline.timeline import Timeline, timeline_dir
from neonctl.engine.project import Project
from neonctl.engine.safekeeper.client import flush_lsn
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import WalDecodeError, WalStreamDecoder
from neonctl.errors import InvalidInput, NeonctlError, NotFound

FORKS = {"main": 0, "fsm": 1, "vm": 2, "init": 3}


def layer_rows(project: Project, branch: str | None) -> list[dict]:
    tid = project.branch(branch).timeline_id if branch else None
    rows = PageserverClient.of(project).layers(tid)
    names = {b.timeline_id: b.name for b in project.config.branches.values()}
    out = []
    for r in rows:
        out.append({"branch": names.get(r["timeline_id"], r["timeline_id"]), **r,
                    "lsn_range": f"{format_lsn(r['lsn_start'])}..{format_lsn(r['lsn_end'])}"})
    return out


def layer_stats(project: Project, branch: str) -> dict:
    """Layer counts and bytes by kind and level, and read amplification across the key space, from the
    explorer's views (the same SQL `layers query` and the TUI run: ancestors' layers under the branch point
    count for reads); the open in-memory layer only while the pageserver runs."""
    project.branch(branch)
    db = MetadataDB(load_snapshot(project, relations=False, gc=False))
    try:
        totals = db.rows("SELECT kind, level, count(*) AS layers, sum(file_size) AS bytes, sum(num_values) AS values"
                         " FROM layers WHERE branch = ? GROUP BY kind, level ORDER BY kind, level", [branch])
        amp = db.rows("SELECT key_start, key_end, start_rel, deltas, read_amplification FROM read_amplification"
                      " WHERE branch = ? ORDER BY key_start", [branch])
        (consistent,) = db.query("SELECT disk_consistent_lsn FROM timelines WHERE branch = ?", [branch])[1][0]
    finally:
        db.close()
    open_layer = None
    try:
        live = PageserverClient.of(project).layer_stats(project.branch(branch).timeline_id)
        open_layer, consistent = live["open_layer"], live["disk_consistent_lsn"]
    except NeonctlError:
        pass  # stopped: the stored layers alone
    return {"totals": totals, "read_amplification": amp,
            "max_read_amplification": max((r["read_amplification"] for r in amp), default=0),
            "disk_consistent_lsn": consistent, "open_layer": open_layer}


def checkpoint(project: Project, branch: str, compact: bool) -> dict:
    tid = project.branch(branch).timeline_id
    return PageserverClient.of(project).checkpoint(tid, compact=compact, wait_for_lsn=flush_lsn(project, tid))


def wal_records(project: Project, branch: str, start: int | None, end: int | None, limit: int = 10000) -> list[dict]:
    tl = Timeline(timeline_dir(project.dir / "pageserver", project.branch(branch).timeline_id))
    head = tl.last_record_lsn
    end = head if end is None else min(end, head)
    if start is None:
        start = tl.meta.start_lsn
    start = tl.record_end_at_or_before(start) if start > tl._known_boundary_floor() else tl._known_boundary_floor()
    if start > end:
        raise InvalidInput(f"--from {format_lsn(start)} is past --to {format_lsn(end)}")
    decoder = WalStreamDecoder(start, tl.meta.wal_seg_size)
    rows, pos = [], start
    try:
        while pos < end and len(rows) < limit:
            chunk = tl.read_wal(pos, min(4 << 20, end - pos + 65536))
            decoder.feed(chunk)
            pos += len(chunk)
            while (raw := decoder.poll()) is not None and len(rows) < limit:
                if raw.lsn >= end:
                    return rows
                rec = decode_record(raw, tl.meta.pg_version)
                rows.append({
                    "lsn": format_lsn(raw.lsn), "end_lsn": format_lsn(raw.end_lsn), "rmgr": rec.rmgr,
                    "type": rec.identify() or f"0x{rec.rmgr_info:02X}", "len": rec.tot_len, "xid": rec.xid,
                    "blocks": " ".join(f"{b.spc}/{b.db}/{b.rel}.{b.fork}:{b.blkno}{'+FPI' if b.has_image else ''}"
                                       for b in rec.blocks)})
    except WalDecodeError:
        pass
    return rows


def parse_rel(text: str) -> tuple[int, int, int]:
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InvalidInput(f"invalid relation {text!r}: expected SPC/DB/RELFILENODE or a table name with --endpoint")
    return int(parts[0]), int(parts[1]), int(parts[2])


def rel_from_table(project: Project, branch: str, table: str) -> tuple[int, int, int]:
    import psycopg  # noqa: PLC0415 - only these two need a connection

    st = running_endpoint(project, branch)
    with psycopg.connect(st.admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT CASE WHEN c.reltablespace = 0 THEN (SELECT dattablespace FROM pg_database"
            " WHERE datname = current_database()) ELSE c.reltablespace END,"
            " CASE WHEN c.relisshared THEN 0 ELSE (SELECT oid FROM pg_database WHERE datname = current_database()) END,"
            " pg_relation_filenode(c.oid) FROM pg_class c WHERE c.oid = to_regclass(%s)", (table,)).fetchone()
    if row is None or row[2] is None:
        raise NotFound(f"no table {table!r} on branch {branch!r}")
    return int(row[0]), int(row[1]), int(row[2])


def page_header(page: bytes) -> dict:
    hi, lo, checksum, flags, lower, upper, special, size_version = struct.unpack_from("<IIHHHHHH", page, 0)
    return {"pd_lsn": format_lsn(hi << 32 | lo), "pd_checksum": checksum, "pd_flags": flags, "pd_lower": lower,
            "pd_upper": upper, "pd_special": special, "page_size": size_version & 0xFF00,
            "layout_version": size_version & 0xFF}


def page_versions(project: Project, branch: str, rel: tuple[int, int, int], fork: str, blkno: int,
                  lsn: int | None, page: bool = True) -> dict:
    """The versions the pageserver holds for a page and (with page) the page itself at the LSN.

    The page comes back as bytes under ``page.image``; ``page.header`` decodes its header.
    """
    if fork not in FORKS:
        raise InvalidInput(f"invalid fork {fork!r}: one of {', '.join(FORKS)}")
    if blkno < 0 or blkno >= 0xFFFFFFFF:
        raise InvalidInput(f"invalid block number {blkno}")
    key = rel_block_key(rel[0], rel[1], rel[2], FORKS[fork], blkno)
    tid = project.branch(branch).timeline_id
    res = PageserverClient.of(project).page(tid, str(key), lsn=lsn, image=page)
    for v in res["versions"]:
        v["lsn"] = format_lsn(v["lsn"])
        if v.get("page_lsn") is not None:
            v["page_lsn"] = format_lsn(v["page_lsn"])
    out = {"key": str(key), "complete": res["complete"], "versions": res["versions"]}
    if page:
        p = res["page"]
        image = bytes.fromhex(p["hex"]) if p["hex"] is not None else None
        out["page"] = {"lsn": format_lsn(p["lsn"]), "source": p["source"], "versions_replayed": p["versions_replayed"],
                       "exists": image is not None, "header": page_header(image) if image is not None else None,
                       "image": image}
    return out


def branch_changes(project: Project, branch: str) -> dict:
    """Relations (by name where a running endpoint can tell) and page counts changed on a branch."""
    tid = project.branch(branch).timeline_id
    res = PageserverClient.of(project).changed_pages(tid, wait_for_lsn=flush_lsn(project, tid))
    names: dict[tuple[int, int], str] = {}
    try:
        names = _relation_names(project, branch)
    except NotFound:
        pass
    fork_names = {v: k for k, v in FORKS.items()}
    rows = []
    for r in res["relations"]:
        rows.append({"relation": names.get((r["db"], r["rel"]), f"{r['spc']}/{r['db']}/{r['rel']}"),
                     "fork": fork_names.get(r["fork"], str(r["fork"])), "pages_changed": r["pages"],
                     "spc": r["spc"], "db": r["db"], "relfilenode": r["rel"]})
    rows.sort(key=lambda r: (-r["pages_changed"], r["relation"]))
    return {"branch": branch, "since_lsn": format_lsn(res["since_lsn"]), "head_lsn": format_lsn(res["head_lsn"]),
            "relations": rows}


def _relation_names(project: Project, branch: str) -> dict[tuple[int, int], str]:
    import psycopg  # noqa: PLC0415 - only these two need a connection

    st = running_endpoint(project, branch)
    out: dict[tuple[int, int], str] = {}
    with psycopg.connect(st.admin_dsn, autocommit=True) as conn:
        dbs = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
    for db in dbs:
        with psycopg.connect(st.admin_dsn, dbname=db, autocommit=True) as conn:
            for oid, node, name in conn.execute(
                    "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()),"
                    " pg_relation_filenode(c.oid), c.oid::regclass::text FROM pg_class c"
                    " WHERE pg_relation_filenode(c.oid) IS NOT NULL"):
                prefix = "" if db == "postgres" else f"{db}."
                out[(int(oid), int(node))] = prefix + name
    return out
