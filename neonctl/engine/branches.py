"""Branches: named timelines. Creating one is metadata only - a pointer (parent, LSN) plus empty WAL.

The pageserver picks the branch point (a record end at or before the asked
LSN, or the last commit at or before the asked time) and the safekeepers get
an empty timeline starting there; the project records the name.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime

from neonctl.engine.compute.endpoint import endpoint_status, list_endpoints, read_state, stop_endpoint
from neonctl.engine.compute.time_travel import time_travel_endpoints
from neonctl.engine.failpoints import failpoint
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.process import process_token, token_alive
from neonctl.engine.project import PENDING_GRACE, Branch, Project, check_name
from neonctl.engine.safekeeper.client import SafekeeperClient, flush_lsn
from neonctl.engine.storage import require_running
from neonctl.engine.timepoint import TimePoint, from_pg_us, parse_timestamp, to_pg_us
from neonctl.errors import AlreadyExists, Conflict, InvalidInput, NeonctlError, NotFound, Timeout


def resolve_parent(project: Project, parent: str | None, lsn: int | None, ts: datetime | None) -> TimePoint:
    if parent is None:
        parent = project.config.default_branch
    project.branch(parent)
    return TimePoint(parent, lsn, ts)


def create_branch(project: Project, name: str, point: TimePoint, if_not_exists: bool = False,
                  suspend_timeout: int | None = None, expires_at: float | None = None) -> tuple[Branch, bool]:
    """Create branch `name` at `point`; returns (branch, created)."""
    check_name("branch", name)
    if suspend_timeout is not None and suspend_timeout < 0:
        raise InvalidInput("--suspend-timeout must be >= 0 seconds (0 = never suspend)")
    if point.lsn is not None and point.timestamp is not None:
        raise InvalidInput("give either an LSN or a timestamp, not both")
    with project.lock():
        project.reload()
        if name in project.config.branches:
            if if_not_exists:
                return project.config.branches[name], False
            raise AlreadyExists(f"branch {name!r} already exists", hint="use --if-not-exists in scripts")
        parent = project.branch(point.branch or project.config.default_branch)
        tid, lsn = create_timeline(project, parent, point)
        failpoint("branch-create-after-timeline")
        try:
            b = Branch(name=name, timeline_id=tid, parent=parent.name, parent_lsn=lsn, suspend_timeout=suspend_timeout,
                       expires_at=expires_at)
            project.config.branches[name] = b
            clear_intent(project, tid)
            project.save()
        except BaseException:
            drop_timeline(project, tid)
            raise
        failpoint("branch-create-after-save")
        return b, True


def create_timeline(project: Project, parent: Branch, point: TimePoint) -> tuple[str, int]:
    """A new timeline off `parent` at `point` (its head if no LSN/time) in the pageserver and on every
    safekeeper; returns (timeline id, branch point). The caller holds the project lock and names it (then
    `clear_intent`); on failure nothing is left behind, and if this process dies midway, the intent recorded
    before the first daemon call lets the next `start` delete what it made."""
    require_running(project)
    if point.timestamp is not None and point.timestamp.timestamp() < _root_created(project):
        raise InvalidInput(f"timestamp {point.timestamp.isoformat()} is before the project's history begins")
    tid = uuid.uuid4().hex
    record_intent(project, tid)
    pageserver = PageserverClient.of(project)
    created = []
    try:
        info = pageserver.create_branch(
            tid, parent.timeline_id, lsn=point.lsn, wait_for_lsn=flush_lsn(project, parent.timeline_id),
            timestamp_us=to_pg_us(point.timestamp) if point.timestamp is not None else None)
        created.append(pageserver)
        lsn = info["start_lsn"]
        for sk in SafekeeperClient.all_of(project).values():
            sk.create_timeline(tid, info["system_id"], info["pg_version"], lsn)
            created.append(sk)
    except BaseException:
        for daemon in reversed(created):
            daemon.delete_timeline(tid)
        clear_intent(project, tid)
        project.save()
        raise
    return tid, lsn


def drop_timeline(project: Project, timeline_id: str) -> None:
    """Delete a timeline from every safekeeper and the pageserver (it must have no child timelines).
    Idempotent: a daemon that no longer has it (an earlier attempt got that far) counts as done."""
    for daemon in [*SafekeeperClient.all_of(project).values(), PageserverClient.of(project)]:
        if isinstance(daemon, PageserverClient):
            failpoint("timeline-drop-between-daemons")
        try:
            daemon.delete_timeline(timeline_id)
        except NotFound:
            pass


def record_intent(project: Project, timeline_id: str) -> None:
    """Say, before a daemon holds it, that this process is making `timeline_id` (saved at once)."""
    project.config.pending_timelines[timeline_id] = time.time()
    project.config.pending_owners[timeline_id] = process_token()
    project.save()


def clear_intent(project: Project, timeline_id: str) -> None:
    """The timeline is named by a branch now, or dropped (the caller saves)."""
    project.config.pending_timelines.pop(timeline_id, None)
    project.config.pending_owners.pop(timeline_id, None)


def _in_progress(project: Project, timeline_id: str, now: float) -> bool:
    """A pending timeline whose command still runs (or, for records without an owner, is recent)."""
    owner = project.config.pending_owners.get(timeline_id)
    if owner is not None:
        return token_alive(owner)
    return now - project.config.pending_timelines[timeline_id] < PENDING_GRACE


def _root_created(project: Project) -> float:
    return min(b.created_at for b in project.config.branches.values())


def delete_branch(project: Project, name: str, force: bool = False) -> Branch:
    with project.lock():
        project.reload()
        b = project.branch(name)
        if name == project.config.default_branch:
            raise Conflict(f"branch {name!r} is the default branch", hint="set another default first")
        children = [c.name for c in project.config.branches.values() if c.parent == name]
        if children:
            raise Conflict(f"branch {name!r} has child branches: {', '.join(children)}")
        st = read_state(project, name)
        if st is not None and endpoint_status(st) == "running" and not force:
            raise Conflict(f"branch {name!r} has a running endpoint", hint="stop it or pass --force")
        tts = [t.name for t, s in time_travel_endpoints(project, name)]
        if tts and not force:
            raise Conflict(f"branch {name!r} has time-travel endpoints: {', '.join(tts)}",
                           hint="stop them or pass --force")
        require_running(project)
    for tt in tts:
        stop_endpoint(project, tt, immediate=True)
    if st is not None:
        stop_endpoint(project, name, immediate=True)
    failpoint("branch-delete-after-endpoint-stop")
    with project.lock():
        project.reload()
        drop_timeline(project, b.timeline_id)  # idempotent: an interrupted delete is finished by a retry
        failpoint("branch-delete-before-save")
        project.config.branches.pop(name, None)
        project.save()
    return b


def reconcile(project: Project, now: float | None = None) -> dict:
    """Make the daemons hold exactly the project's timelines, as Neon's pageserver reconciles with its control
    plane on attach: a timeline no branch names (a branch create or reset killed midway) is deleted, unless an
    operation still under way recorded it (pending, and the command that recorded it still runs); a branch
    whose timeline a daemon lacks is reported. Runs at `neonctl start`, under the project lock."""
    now = time.time() if now is None else now
    with project.lock():
        project.reload()
        named = {b.timeline_id for b in project.config.branches.values()}
        pending = {t for t in project.config.pending_timelines if _in_progress(project, t, now)}
        held: dict[str, set[str]] = {}
        held["pageserver"] = set(PageserverClient.of(project).status(timeout=10).get("timelines", {}))
        for sk in SafekeeperClient.all_of(project).values():
            held[sk.name] = set(sk.status(timeout=10).get("timelines", {}))
        orphans, failed = [], {}
        for tid in sorted(set().union(*held.values()) - named - pending):
            try:
                drop_timeline(project, tid)
                orphans.append(tid)
            except NeonctlError as e:  # e.g. an orphan with an orphan child: the next start gets it
                failed[tid] = str(e)
        stale = [t for t in project.config.pending_timelines if t not in pending]
        for t in stale:
            clear_intent(project, t)
        if stale:
            project.save()
        missing = {name: sorted(named - tl) for name, tl in held.items() if named - tl}
        return {"orphans_deleted": orphans, "orphans_failed": failed, "missing": missing}


def rename_branch(project: Project, old: str, new: str) -> Branch:
    check_name("branch", new)
    with project.lock():
        project.reload()
        b = project.branch(old)
        if new in project.config.branches:
            raise AlreadyExists(f"branch {new!r} already exists")
        if read_state(project, old) is not None or time_travel_endpoints(project, old):
            raise Conflict(f"branch {old!r} has an endpoint; stop it before renaming")
        b.name = new
        project.config.branches = {(new if k == old else k): v for k, v in project.config.branches.items()}
        for c in project.config.branches.values():
            if c.parent == old:
                c.parent = new
        if project.config.default_branch == old:
            project.config.default_branch = new
        failpoint("branch-rename-before-save")
        project.save()
        return b


def set_default(project: Project, name: str) -> Branch:
    with project.lock():
        project.reload()
        b = project.branch(name)
        project.config.default_branch = name
        project.save()
        return b


def branch_rows(project: Project) -> list[dict]:
    """Branches in tree order (parents before children) with their heads and endpoints."""
    eps = {st.branch: (st, s) for st, s in list_endpoints(project) if st.at_lsn is None}
    heads = {}
    try:
        st = PageserverClient.of(project).status(timeout=5)
        heads = {k: v["last_record_lsn"] for k, v in st["timelines"].items()}
    except NeonctlError:  # listing works with the daemons stopped: no heads then
        pass
    by_parent: dict[str | None, list[Branch]] = {}
    for b in project.config.branches.values():
        by_parent.setdefault(b.parent, []).append(b)
    rows: list[dict] = []

    def walk(parent: str | None, depth: int) -> None:
        for b in sorted(by_parent.get(parent, []), key=lambda x: x.created_at):
            ep = eps.get(b.name)
            rows.append({
                "name": b.name, "tree": "  " * depth + ("┗━ " if depth else "") + b.name,
                "id": b.timeline_id, "parent": b.parent,
                "parent_lsn": format_lsn(b.parent_lsn) if b.parent_lsn is not None else None,
                "head_lsn": format_lsn(heads[b.timeline_id]) if b.timeline_id in heads else None,
                "default": b.name == project.config.default_branch,
                "endpoint": f"{ep[1]} :{ep[0].port}" if ep else None,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.created_at)),
                "expires_at": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.expires_at))
                               if b.expires_at is not None else None),
            })
            walk(b.name, depth + 1)

    walk(None, 0)
    return rows


def lookup_lsn(project: Project, branch: str, *, timestamp: str | None = None, lsn: str | None = None) -> dict:
    """A commit time -> the LSN of the last commit at or before it; or an LSN -> that commit's LSN and time."""
    b = project.branch(branch)
    if (timestamp is None) == (lsn is None):
        raise InvalidInput("give exactly one of --timestamp or --lsn")
    pageserver = PageserverClient.of(project)
    if timestamp is not None:
        ts = parse_timestamp(timestamp)
        return {"branch": branch, "timestamp": ts.isoformat(),
                "lsn": format_lsn(pageserver.lsn_by_timestamp(b.timeline_id, to_pg_us(ts)))}
    want = parse_lsn(lsn)
    before = [c for c in pageserver.commits(b.timeline_id) if c[0] <= want]
    if not before:
        raise InvalidInput(f"no commit at or before {lsn} on branch {branch!r}")
    return {"branch": branch, "lsn": lsn, "commit_lsn": format_lsn(before[-1][0]),
            "commit_time": from_pg_us(before[-1][1]).isoformat()}


def image_at_head(project: Project, branch: str, timeout: float = 60.0) -> int:
    """The branch's head (its compute stopped), with an image made there: children branched at that point
    start from the image with no WAL to replay (the pytest plugin's template). Returns the head LSN."""
    tl = project.branch(branch).timeline_id
    head = flush_lsn(project, tl)
    pageserver = PageserverClient.of(project)
    deadline = time.monotonic() + timeout
    while pageserver.timeline(tl)["last_record_lsn"] < head:
        if time.monotonic() > deadline:
            raise Timeout(f"the pageserver did not ingest branch {branch!r} up to {format_lsn(head)}")
        time.sleep(0.02)
    try:
        pageserver.create_image(tl)
    except Conflict:
        pass  # no checkpoint since the newest image: that one serves
    return head

