"""Reset and restore: a branch takes the content of another point in place, keeping its name and port.

Neon's `branches reset N --parent` and `branches restore N SOURCE[@LSN|@TIME]`.
Timelines are immutable history, so neither rewrites one: a new timeline is
branched off the source point, then swapped in under N's name.

1. Validate everything and create the new timeline (pageserver + safekeepers).
   Nothing else has changed yet; a bad point fails here.
2. Stop N's compute (and its read-only time-travel endpoints, which show the
   old history).
3. Under the project lock, swap: N -> new timeline (its parent is now the
   source branch); the old timeline survives as branch X (`--preserve-under-name`,
   or for restore always, by default `N_old_<head time>` as Neon names it) or is
   deleted. N's children hang off the old timeline, so they move to X.
4. Start N's compute again on the same port if it was running.

After `restore N ^self@P` the backup X holds the old timeline and is N's
parent (as in Neon), so `reset N --parent` undoes the restore.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from neonctl.engine.branches import branch_rows, clear_intent, create_branch, create_timeline, drop_timeline
from neonctl.engine.compute.endpoint import (
    EndpointState,
    endpoint_status,
    read_state,
    start_endpoint,
    stop_endpoint,
)
from neonctl.engine.compute.time_travel import resolve_point, time_travel_endpoints
from neonctl.engine.connection import proxy_uri
from neonctl.engine.expiry import parse_expiry
from neonctl.engine.failpoints import failpoint
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import NAME_RE, Branch, Project, check_name
from neonctl.engine.storage import require_running
from neonctl.engine.timepoint import TimePoint, from_pg_us, parse_point, parse_ref_with
from neonctl.errors import AlreadyExists, Conflict, InvalidInput, NeonctlError, PostgresError


@dataclass
class SwapResult:
    branch: Branch
    preserved: Branch | None
    source: str  # e.g. "main@0/16B3748" or "main (head)"
    endpoint: EndpointState | None  # the restarted compute, if N had one running


def parse_source(project: Project, target: Branch, text: str, allow_own_head: bool = False) -> TimePoint:
    """`^self@P`, `^parent[@P]` or `BRANCH[@P]` (P an LSN or an ISO-8601 time) relative to `target`."""
    base, at_sign, at = text.partition("@")
    if base == "^self":
        name = target.name
    elif base == "^parent":
        if target.parent is None:
            raise InvalidInput(f"branch {target.name!r} is a root branch: it has no ^parent")
        name = target.parent
    elif base.startswith("^") or not base:
        raise InvalidInput(f"invalid source {text!r}: expected ^self@POINT, ^parent[@POINT] or BRANCH[@POINT]")
    else:
        name = project.branch(base).name
    lsn = ts = None
    if at_sign:
        other, lsn, ts = parse_point(at)
        if other is not None or not at:
            raise InvalidInput(
                f"invalid point {at!r} in {text!r}: expected an LSN like 0/16B3748 or an ISO-8601 timestamp"
            )
    if name == target.name and lsn is None and ts is None and not allow_own_head:
        raise InvalidInput(
            f"restoring {target.name!r} to its own head changes nothing",
            hint=f"give a point: {base}@LSN or {base}@TIMESTAMP",
        )
    return TimePoint(name, lsn, ts)


def reset_branch(
    project: Project, name: str, preserve_under: str | None = None, progress=lambda msg: None
) -> SwapResult:
    """`branch reset N --parent`: N becomes its parent's latest state."""
    b = project.branch(name)
    if b.parent is None:
        raise InvalidInput(f"branch {name!r} is a root branch: it has no parent to reset from")
    return _swap(
        project, name, TimePoint(b.parent), preserve_under, keep_old=preserve_under is not None, progress=progress
    )


def restore_branch(
    project: Project, name: str, source: str, preserve_under: str | None = None, progress=lambda msg: None
) -> SwapResult:
    """`branch restore N SOURCE`: N's content becomes the source point's; N's old state is kept as a backup."""
    b = project.branch(name)
    point = parse_source(project, b, source)
    backup = preserve_under if preserve_under is not None else default_backup_name(project, b)
    return _swap(project, name, point, backup, keep_old=True, progress=progress)


def default_backup_name(project: Project, b: Branch) -> str:
    """`N_old_<time of N's last commit>` (Neon's `{branch_name}_old_{head_timestamp}`), in ISO 8601 basic
    format so that it is a valid branch name; `_2`, `_3`... if taken."""
    when = datetime.now(timezone.utc)
    try:
        commits = PageserverClient.of(project).commits(b.timeline_id)
        if commits:
            when = from_pg_us(commits[-1][1])
    except NeonctlError:  # the name is cosmetic (now, then); the swap itself reports a down pageserver
        pass
    base = f"{b.name}_old_{when.strftime('%Y%m%dT%H%M%SZ')}"
    if not NAME_RE.match(base):
        raise InvalidInput(
            f"branch name {b.name!r} is too long for an automatic backup name",
            hint="name the backup with --preserve-under-name",
        )
    name, n = base, 1
    while name in project.config.branches:
        n += 1
        name = f"{base}_{n}"
    return name


def _describe(point: TimePoint) -> str:
    if point.lsn is not None:
        return f"{point.branch}@{format_lsn(point.lsn)}"
    if point.timestamp is not None:
        return f"{point.branch}@{point.timestamp.isoformat()}"
    return f"{point.branch} (head)"


def _swap(
    project: Project, name: str, point: TimePoint, preserve_under: str | None, keep_old: bool, progress
) -> SwapResult:
    # 1. validate, then create the new timeline: the first change, and nothing else changes if it fails
    with project.lock():
        project.reload()
        n = project.branch(name)
        if preserve_under is not None:
            check_name("branch", preserve_under)
            if preserve_under in project.config.branches:
                raise AlreadyExists(
                    f"branch {preserve_under!r} already exists", hint="choose another name for --preserve-under-name"
                )
        children = sorted(c.name for c in project.config.branches.values() if c.parent == name)
        if children and not keep_old:
            raise Conflict(
                f"branch {name!r} has child branches ({', '.join(children)}) that depend on its current history",
                hint="pass --preserve-under-name to keep it as a branch they move to",
            )
        source = project.branch(point.branch)
        require_running(project)
        old_tid, old_parent, old_parent_lsn, old_created = n.timeline_id, n.parent, n.parent_lsn, n.created_at
        if point.lsn is not None or point.timestamp is not None:  # check the point, and fix it to a record end
            point = TimePoint(source.name, resolve_point(project, point)[1])
        progress(f"branching {_describe(point)} for {name!r} ...")
        new_tid, new_lsn = create_timeline(project, source, point)  # recorded pending: not an orphan while we work
        failpoint("branch-swap-after-create")
        st = read_state(project, name)
        was_running = st is not None and endpoint_status(st) == "running"
        tts = [t.name for t, _ in time_travel_endpoints(project, name)]
    # 2. stop the computes that show the old history
    try:
        for tt in tts:
            progress(f"stopping time-travel endpoint {tt} (it shows {name!r}'s old history)")
            stop_endpoint(project, tt, immediate=True)
        if st is not None:
            if _directory_outdated(project, st, new_tid):
                # Its directory cannot be rebuilt to the new point (its compute started before the image the
                # new point replays from), so its shutdown checkpoint would write pages nobody reads again.
                # Nothing acknowledged is lost: every commit is on a quorum of safekeepers.
                progress(f"stopping the endpoint of {name!r} on port {st.port} (immediate: its directory is "
                         "older than the new point's image) ...")
                stop_endpoint(project, name, immediate=True)
            else:
                progress(f"stopping the endpoint of {name!r} on port {st.port} ...")
                stop_endpoint(project, name)
        failpoint("branch-swap-after-stop")
    except BaseException:
        with project.lock():
            drop_timeline(project, new_tid)
            project.reload()
            clear_intent(project, new_tid)
            project.save()
        raise
    # 3. swap under the lock, unless someone changed N meanwhile
    with project.lock():
        project.reload()
        n = project.config.branches.get(name)
        if n is None or n.timeline_id != old_tid or (preserve_under and preserve_under in project.config.branches):
            drop_timeline(project, new_tid)
            clear_intent(project, new_tid)
            project.save()
            raise Conflict(f"branch {name!r} changed while it was being reset; nothing was done", hint="try again")
        preserved = None
        if keep_old:
            preserved = Branch(
                name=preserve_under,
                timeline_id=old_tid,
                parent=old_parent,
                parent_lsn=old_parent_lsn,
                created_at=old_created,
            )
            project.config.branches[preserve_under] = preserved
            for c in project.config.branches.values():
                if c.parent == name:
                    c.parent = preserve_under
        n.timeline_id, n.parent, n.parent_lsn = new_tid, source.name if source.name != name else preserve_under, new_lsn
        clear_intent(project, new_tid)
        project.save()
        failpoint("branch-swap-after-save")
    # 4. the same compute, on the same port, on the new history; then the old history goes. In this order
    # the stopped directory's history still exists when the restart looks for a directory to rebuild from,
    # so it rewrites what differs instead of restoring in full. An old timeline a crash leaves behind is
    # unnamed: the next `neonctl start` deletes it.
    ep = None
    try:
        if was_running:
            progress(f"restarting the endpoint of {name!r} on port {st.port} ...")
            try:
                ep = start_endpoint(project, name, port=st.port, fsync=st.fsync, progress=progress)
            except (Conflict, PostgresError) as e:  # e.g. the port was taken in the moment it was free
                raise PostgresError(
                    f"branch {name!r} now holds {_describe(point)}, but its endpoint did not restart"
                    f" on port {st.port}: {e.message}",
                    hint=f"neonctl endpoint start {name}",
                ) from e
    finally:
        if not keep_old:
            try:
                with project.lock():
                    drop_timeline(project, old_tid)
            except Exception as e:  # noqa: BLE001 - the swap is done; an orphan timeline only costs disk
                progress(f"WARNING: could not delete the old timeline {old_tid}: {e}")
    return SwapResult(branch=n, preserved=preserved, source=_describe(point), endpoint=ep)


def _directory_outdated(project: Project, st, new_tid: str) -> bool:
    """Whether the running compute's directory started before the newest image of the new timeline's head
    (images/rebuild.py's hint-bit rule then rules it out as the restart's rebuild source)."""
    if st.at_lsn is not None or endpoint_status(st) != "running":
        return False
    try:
        image = PageserverClient.of(project).timeline(new_tid).get("newest_image_lsn")
    except NeonctlError:
        return False
    since = st.start_lsn if st.directory_since_lsn is None else min(st.start_lsn, st.directory_since_lsn)
    return image is not None and since < image


def create_with_options(project: Project, name: str, parent: str | None, *, lsn: str | None = None,
                        timestamp: str | None = None, if_not_exists: bool = False,
                        suspend_timeout: int | None = None, expires_at: str | None = None, ttl: str | None = None,
                        endpoint: bool = False, progress: Callable[[str], None] = lambda m: None) -> dict:
    """`neonctl branch create`: the branch at `parent` (BRANCH[@LSN|@TIME]) or --lsn/--timestamp, with its
    expiry, and (with `endpoint`) its compute started; returns its row, plus the proxy's connection string."""
    point = parse_ref_with(parent, lsn, timestamp, what="the branch point")
    expiry = parse_expiry(expires_at, ttl)
    _b, created = create_branch(project, name, point, if_not_exists=if_not_exists,
                                suspend_timeout=suspend_timeout, expires_at=expiry)
    if not created:
        progress(f"branch {name!r} already exists; returning it")
    row = next(r for r in branch_rows(project) if r["name"] == name)
    if endpoint:
        st = start_endpoint(project, name, progress=progress)
        row["endpoint"] = f"running :{st.port}"
        row["connection_string"] = proxy_uri(project, name)
    return row

