"""Operating a project's safekeepers one by one: list, stop, start, repair.

The CLI's `neonctl safekeeper ...` and `neonctl status` read and act through
here; the daemons themselves are `process.BackgroundProcess`es like every
other storage daemon.
"""

from __future__ import annotations

from neonctl.engine.compute.endpoint import forget_recycled, read_state, stop_endpoint
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.process import BackgroundProcess
from neonctl.engine.project import Project
from neonctl.engine.safekeeper.client import SafekeeperClient
from neonctl.errors import DaemonError, InvalidInput, NotFound


def daemon(project: Project, sk_id: int) -> BackgroundProcess:
    if sk_id not in project.safekeeper_addrs():
        raise InvalidInput(f"project {project.name!r} has no safekeeper {sk_id}",
                           hint=f"safekeepers: {', '.join(map(str, project.safekeeper_addrs()))}")
    return project.daemon(f"sk{sk_id}")


def start_safekeeper(project: Project, sk_id: int) -> dict:
    d = daemon(project, sk_id)
    was = d.pid()
    pid = d.start()
    return {"safekeeper": sk_id, "pid": pid, "already_running": was is not None}


def stop_safekeeper(project: Project, sk_id: int, immediate: bool = False) -> dict:
    """Stop one safekeeper; `immediate` is kill -9 (its WAL and control file stay as the crash left them)."""
    d = daemon(project, sk_id)
    return {"safekeeper": sk_id, "stopped": d.stop(immediate=immediate), "immediate": immediate}


def branch_names(project: Project) -> dict[str, str]:
    return {b.timeline_id: name for name, b in project.config.branches.items()}


def safekeeper_rows(project: Project) -> list[dict]:
    """One row per (safekeeper, timeline): term, flush/commit LSN, lag behind the most advanced peer."""
    names = branch_names(project)
    rows: list[dict] = []
    for sk_id, addr in project.safekeeper_addrs().items():
        d = project.daemon(f"sk{sk_id}")
        pid = d.pid()
        st = None
        if pid is not None:
            try:
                st = SafekeeperClient(sk_id, addr).status(timeout=3)
            except DaemonError:
                st = None
        if st is None:
            rows.append({"safekeeper": sk_id, "address": addr, "state": "stopped" if pid is None else "unhealthy",
                         "pid": pid, "branch": None, "timeline_id": None, "term": None, "flush_lsn": None,
                         "commit_lsn": None, "lag_bytes": None, "streaming": None, "error": None})
            continue
        for tid, tl in st.get("timelines", {}).items():
            rows.append({"safekeeper": sk_id, "address": addr, "state": "corrupt" if tl.get("corrupt") else "running",
                         "pid": pid, "branch": names.get(tid), "timeline_id": tid, "term": tl.get("term"),
                         "last_log_term": tl.get("last_log_term"), "flush_lsn": tl.get("flush_lsn"),
                         "commit_lsn": tl.get("commit_lsn"), "lag_bytes": None, "streaming": tl.get("streaming"),
                         "remote_consistent_lsn": tl.get("remote_consistent_lsn"),
                         "wal_start_lsn": tl.get("wal_start_lsn"), "error": tl.get("corrupt") or tl.get("last_error")})
    heads: dict[str, int] = {}
    for r in rows:
        if r["flush_lsn"] is not None:
            heads[r["timeline_id"]] = max(heads.get(r["timeline_id"], 0), r["flush_lsn"])
    for r in rows:
        if r["flush_lsn"] is not None:
            r["lag_bytes"] = heads[r["timeline_id"]] - r["flush_lsn"]
    return rows


def repair_safekeeper(project: Project, sk_id: int) -> list[dict]:
    """Rebuild every damaged timeline of one safekeeper: from its peers, or, for the project's only
    safekeeper, at the end of the WAL the pageserver holds (`repair_from_pageserver`)."""
    d = daemon(project, sk_id)
    if d.pid() is None:
        raise DaemonError(f"safekeeper {sk_id} is not running", hint=f"neonctl safekeeper start {sk_id}")
    sk = SafekeeperClient(sk_id, project.safekeeper_addrs()[sk_id])
    st = sk.status()
    names = branch_names(project)
    out = []
    for tid, tl in st["timelines"].items():
        if not tl.get("corrupt"):
            continue
        if len(project.safekeeper_addrs()) == 1:
            out.append(repair_from_pageserver(project, sk, tid, names.get(tid), tl["corrupt"]))
            continue
        res = sk.repair(tid)
        out.append({"safekeeper": sk_id, "branch": names.get(tid), "timeline_id": tid, "repaired": True,
                    "was": tl["corrupt"], "term": res.get("term")})
    return out


def repair_from_pageserver(project: Project, sk: SafekeeperClient, tid: str, branch: str | None,
                           was: str) -> dict:
    """A lone safekeeper's damaged timeline, rebuilt at the pageserver's last record (pageserver_repair.py).

    The CLI reads the pageserver and hands its values to the safekeeper (which needs no pageserver address
    of its own): first the branch's compute is stopped, its data directory may be ahead of that point; then,
    under the project lock, the pageserver makes its WAL durable and names its end, the kept directory of a
    stopped compute of the branch is no longer taken as it is, and the safekeeper rebuilds the timeline.
    """
    stopped = False
    if branch is not None and read_state(project, branch) is not None:
        # Immediate: its only safekeeper is damaged, and a state beyond the pageserver's is discarded anyway.
        stop_endpoint(project, branch, immediate=True)
        stopped = True
    with project.lock():
        try:
            info = PageserverClient.of(project).sync(tid)
        except DaemonError as e:
            raise DaemonError(f"safekeeper {sk.id} is the project's only safekeeper, so its damaged timeline "
                              f"{tid} is rebuilt from the pageserver's WAL; the pageserver does not answer: "
                              f"{e.message}", hint="neonctl start") from None
        except NotFound:
            raise NotFound(f"safekeeper {sk.id} is the project's only safekeeper and the pageserver has no timeline "
                           f"{tid}: there is no WAL to rebuild it from", hint="delete its branch") from None
        forget_recycled(project, tid)
        res = sk.repair(tid, pageserver={k: info[k] for k in ("last_record_lsn", "system_id", "pg_version",
                                                                 "wal_seg_size")})
    return {"safekeeper": sk.id, "branch": branch, "timeline_id": tid, "repaired": True, "was": was,
            "term": res.get("term"), "source": res["source"], "recovered_to": res["recovered_to"],
            "lost_from": res["lost_from"], "lost_to": res["lost_to"], "lost_bytes": res["lost_bytes"],
            "summary": res["summary"], "endpoint_stopped": stopped}
