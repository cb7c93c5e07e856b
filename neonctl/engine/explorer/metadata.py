"""A snapshot of a project's storage metadata, read from its files without disturbing the daemons.

What the pageserver commits to disk is the truth the explorer shows: each timeline's
``metadata.json`` (ancestry, branch point, head), ``layers/index_part.json`` (the layer map's commit
point: every layer with its key and LSN range, size and value count, the images and the persisted GC
cutoff), ``commits.bin`` (commit LSN -> commit time) and the WAL segment files. These are written
atomically (renamed into place or append-only), so reading them while the daemons run is safe, and
they are all there with the daemons stopped. The DuckDB catalog is not read: the pageserver holds it
open.

Three things are not on disk and come from running processes when they run: the live heads
(the pageserver's ``last_record_lsn``, ahead of metadata.json between syncs), relation names (the
catalog of a branch's running compute) and what GC would remove now (the pageserver's dry run).
A snapshot records what was missing in ``notes``.

A snapshot is plain rows, so it can be written to JSON and replayed (``to_json``/``from_json``):
the TUI's snapshot tests run on a recorded one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neonctl.engine.explorer.keys import decode_key, relation_key_range
from neonctl.engine.lsn import WAL_SEGMENT_SIZE, parse_lsn, parse_segment_file_name
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.pageserver.workdir import timeline_dir
from neonctl.engine.project import Project
from neonctl.engine.timepoint import PG_EPOCH_UNIX
from neonctl.errors import NeonctlError

_COMMIT_REC = 16  # (<Q end LSN, <q pg microseconds)


@dataclass
class StorageSnapshot:
    """Rows of every view, as plain Python values (LSNs as integers, times as Unix seconds)."""

    project: str
    taken_at: float
    default_branch: str
    daemons: list[dict] = field(default_factory=list)
    timelines: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    relations: list[dict] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)
    wal: list[dict] = field(default_factory=list)
    gc: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pageserver_running(self) -> bool:
        return any(d["name"] == "pageserver" and d["state"] == "running" for d in self.daemons)

    def timeline(self, branch: str) -> dict:
        for t in self.timelines:
            if t["branch"] == branch:
                return t
        raise KeyError(branch)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StorageSnapshot:
        return cls(**json.loads(text))


def layer_row(branch: str, timeline_id: str, d: dict) -> dict:
    """A `layers` row from an index_part.json entry: the entry plus decoded key bounds."""
    s, e = decode_key(d["key_start"]), decode_key(d["key_end"])
    return {"branch": branch, "timeline_id": timeline_id, "name": d["name"], "kind": d["kind"], "level": d["level"],
            "key_start": d["key_start"], "key_end": d["key_end"],
            "start_space": s["space"], "start_rel": s["rel"], "start_fork": s["fork"], "start_block": s["block"],
            "end_space": e["space"], "end_rel": e["rel"], "end_fork": e["fork"], "end_block": e["block"],
            "lsn_start": d["lsn_start"], "lsn_end": d["lsn_end"], "file_size": d["file_size"],
            "num_values": d["num_values"],
            # image layers zstd-compress each page when that is smaller; delta values are stored as WAL has them
            "compression": "zstd" if d["kind"] == "image" else "none"}


def read_commits(path: Path) -> list[tuple[int, int]]:
    """(commit end LSN, Postgres microseconds) pairs of a commits.bin; a torn last entry is ignored."""
    import numpy as np

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    n = len(data) // _COMMIT_REC
    return [tuple(r) for r in np.frombuffer(data[:n * _COMMIT_REC], dtype="<i8").reshape(-1, 2).tolist()]


def pitr_cutoff(commits: list[tuple[int, int]], start_lsn: int, head: int, pitr_interval: float, now: float) -> int:
    """The newest LSN older than the PITR window (as `pageserver/timeline/gc.py` computes it)."""
    horizon_us = int((now - pitr_interval - PG_EPOCH_UNIX) * 1_000_000)
    lsn = start_lsn
    for end_lsn, xact_time in commits:
        if xact_time > horizon_us:
            return min(max(lsn, start_lsn), head)
        lsn = max(lsn, end_lsn)
    return head


class MetadataLoader:
    """Takes snapshots of one project; remembers relation names and GC's answer per head, so a refresh
    asks a compute or the pageserver again only after the branch's WAL moved on."""

    def __init__(self, project: Project, relations: bool = True, gc: bool = True):
        self.project = project
        self.want_relations = relations
        self.want_gc = gc
        self._relations: dict[str, tuple[int, list[dict]]] = {}
        self._gc: tuple[tuple, list[dict], dict] | None = None

    def load(self, now: float | None = None) -> StorageSnapshot:
        from neonctl.engine.pageserver.config import PageserverConfig
        from neonctl.engine.storage import storage_status

        p = self.project
        p.reload()
        now = time.time() if now is None else now
        snap = StorageSnapshot(p.name, now, p.config.default_branch)
        status = storage_status(p)
        snap.daemons = [{"name": d["name"], "state": d["state"], "pid": d["pid"], "address": d["address"]}
                        for d in status]
        live_heads: dict[str, int] = {}
        for d in status:
            if d["name"] == "pageserver":
                live_heads = {k: v["last_record_lsn"] for k, v in d.get("timelines", {}).items()}
        if not snap.pageserver_running:
            snap.notes.append("the pageserver is not running: heads as of its last metadata sync, no GC plan")
        workdir = p.dir / "pageserver"
        config = PageserverConfig.load(workdir)
        by_tl = {b.timeline_id: b.name for b in p.config.branches.values()}
        heads: dict[str, int] = {}
        for b in sorted(p.config.branches.values(), key=lambda b: (b.created_at, b.name)):
            tdir = timeline_dir(workdir, b.timeline_id)
            try:
                meta = json.loads((tdir / "metadata.json").read_text())
            except (FileNotFoundError, ValueError):
                snap.notes.append(f"branch {b.name}: no timeline metadata in {tdir}")
                continue
            try:
                index = json.loads((tdir / "layers" / "index_part.json").read_text())
            except (FileNotFoundError, ValueError):
                index = {"disk_consistent_lsn": 0, "extra": {}, "layers": []}
            head = max(live_heads.get(b.timeline_id, 0), meta["last_record_lsn"])
            heads[b.name] = head
            commits = read_commits(tdir / "commits.bin")
            snap.timelines.append({
                "branch": b.name, "timeline_id": b.timeline_id, "parent": b.parent,
                "ancestor_timeline": meta["ancestor_timeline"],
                "branch_point": meta["ancestor_lsn"] if meta["ancestor_timeline"] else None,
                "start_lsn": meta["start_lsn"], "head": head, "disk_consistent_lsn": index["disk_consistent_lsn"],
                "initdb_lsn": meta["initdb_lsn"], "created_at": meta.get("created_at") or b.created_at,
                "gc_cutoff": index.get("extra", {}).get("gc_cutoff", 0),
                "pitr_cutoff": pitr_cutoff(commits, meta["start_lsn"], head, config.pitr_interval, now),
                "space_cutoff": max(meta["start_lsn"], head - config.gc_horizon),
                "pitr_interval_s": config.pitr_interval, "gc_horizon": config.gc_horizon,
                "is_default": b.name == p.config.default_branch})
            snap.layers += [layer_row(b.name, b.timeline_id, d) for d in index["layers"]]
            last = index.get("extra", {}).get("gc_last")
            if last:
                snap.gc += [{"branch": b.name, "timeline_id": b.timeline_id, "run": "last", "ran_at": last["at"],
                             "cutoff": last["cutoff"], **r} for r in last["removed"]]
            snap.commits += [{"branch": b.name, "timeline_id": b.timeline_id, "lsn": lsn,
                              "time": PG_EPOCH_UNIX + us / 1e6} for lsn, us in commits]
            seg = meta.get("wal_seg_size", WAL_SEGMENT_SIZE)
            wal_dir = tdir / "wal"
            for f in sorted(wal_dir.iterdir()) if wal_dir.is_dir() else []:
                try:
                    segno = parse_segment_file_name(f.name, seg_size=seg)
                    size = f.stat().st_size
                except (ValueError, OSError):
                    continue
                start = segno * seg
                snap.wal.append({"branch": b.name, "timeline_id": b.timeline_id, "segment": f.name,
                                 "start_lsn": start, "end_lsn": start + seg, "file_bytes": size,
                                 "wal_bytes": max(0, min(start + seg, head) - max(start, meta["start_lsn"]))})
        if self.want_relations:
            snap.relations = self._relation_rows(heads, snap.notes)
        if self.want_gc and snap.pageserver_running:
            snap.gc += self._gc_rows(by_tl, snap)
        return snap

    # -- from running processes ------------------------------------------------------------------

    def _relation_rows(self, heads: dict[str, int], notes: list[str]) -> list[dict]:
        from neonctl.engine.compute.endpoint import running_endpoint
        from neonctl.errors import NeonctlError

        rows: list[dict] = []
        missing = []
        for branch, head in heads.items():
            cached = self._relations.get(branch)
            if cached is not None and cached[0] == head:
                rows += cached[1]
                continue
            try:
                st = running_endpoint(self.project, branch)
                found = relations_of(st.admin_dsn, branch)
            except NeonctlError:
                missing.append(branch)
                continue
            except Exception as e:  # noqa: BLE001 - a compute going away mid-query: names next time
                notes.append(f"branch {branch}: relation names unavailable ({e.__class__.__name__})")
                continue
            self._relations[branch] = (head, found)
            rows += found
        if missing:
            notes.append(f"no running compute on {', '.join(missing)}: relations there are shown by number")
        return rows

    def _gc_rows(self, by_tl: dict[str, str], snap: StorageSnapshot) -> list[dict]:
        key = tuple(sorted((t["timeline_id"], t["head"]) for t in snap.timelines))
        if self._gc is not None and self._gc[0] == key:
            rows, cutoffs = self._gc[1], self._gc[2]
        else:
            try:
                results = PageserverClient.of(self.project).gc([t["timeline_id"] for t in snap.timelines],
                                                               dry_run=True, timeout=10)
            except NeonctlError as e:
                snap.notes.append(f"no GC plan: {e}")
                return []
            sizes = {(r["timeline_id"], r["name"]): r["file_size"] for r in snap.layers}
            rows, cutoffs = [], {}
            for r in results:
                tid = r["timeline_id"]
                cutoff = parse_lsn(r["cutoff"])
                cutoffs[tid] = cutoff
                branch = by_tl.get(tid, tid)
                for kind, names in (("image", r["images_removed"]), ("delta", r["deltas_removed"])):
                    rows += [{"branch": branch, "timeline_id": tid, "run": "planned", "ran_at": None, "kind": kind,
                              "file": n, "bytes": sizes.get((tid, n), 0), "cutoff": cutoff} for n in names]
                seg = (r["bytes_freed"] - sum(x["bytes"] for x in rows if x["timeline_id"] == tid)) // max(
                    1, len(r["wal_segments_removed"])) if r["wal_segments_removed"] else 0
                rows += [{"branch": branch, "timeline_id": tid, "run": "planned", "ran_at": None, "kind": "wal",
                          "file": f"segment {s}", "bytes": seg, "cutoff": cutoff} for s in r["wal_segments_removed"]]
            self._gc = (key, rows, cutoffs)
        for t in snap.timelines:
            t["gc_planned_cutoff"] = cutoffs.get(t["timeline_id"])
        return rows


def relations_of(dsn: str, branch: str) -> list[dict]:
    """Every relation with storage in every database of a running compute, with its key range."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        dbs = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")]
    out: dict[tuple[int, int, int], dict] = {}
    for db in dbs:
        with psycopg.connect(dsn, dbname=db, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT CASE WHEN c.reltablespace = 0 THEN d.dattablespace ELSE c.reltablespace END,"
                " CASE WHEN c.relisshared THEN 0 ELSE d.oid END, pg_relation_filenode(c.oid),"
                " c.oid::regclass::text, c.relkind::text"
                " FROM pg_class c, pg_database d WHERE d.datname = current_database()"
                " AND pg_relation_filenode(c.oid) IS NOT NULL").fetchall()
        for spc, dboid, node, name, kind in rows:
            k = (int(spc), int(dboid), int(node))
            if k in out:
                continue  # a shared catalog appears in every database
            start, end = relation_key_range(*k)
            out[k] = {"branch": branch, "database": None if dboid == 0 else db, "name": name, "relkind": kind,
                      "spc": k[0], "db": k[1], "relfilenode": k[2], "rel": f"{k[0]}/{k[1]}/{k[2]}",
                      "key_start": start, "key_end": end}
    return sorted(out.values(), key=lambda r: r["key_start"])


def load_snapshot(project: Project, relations: bool = True, gc: bool = True) -> StorageSnapshot:
    return MetadataLoader(project, relations, gc).load()
