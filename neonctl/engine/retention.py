"""`neonctl gc` from the CLI side: tell the pageserver which time-travel points are in use, run GC."""

from __future__ import annotations

from neonctl.engine.compute.endpoint import list_endpoints
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import Project


def run_gc(project: Project, branch: str | None = None, dry_run: bool = False) -> list[dict]:
    leases: dict[str, list[int]] = {}
    for st, _status in list_endpoints(project):
        if st.at_lsn is not None:  # a running time-travel endpoint must stay restartable
            leases.setdefault(st.timeline_id, []).append(st.at_lsn)
    timelines = [project.branch(branch).timeline_id] if branch else None
    res = PageserverClient.of(project).gc(timelines, dry_run=dry_run, leases=leases)
    names = {b.timeline_id: b.name for b in project.config.branches.values()}
    for r in res:
        r["branch"] = names.get(r["timeline_id"], r["timeline_id"])
    return res
