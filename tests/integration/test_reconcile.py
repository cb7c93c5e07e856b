"""Interrupted branch operations are finished or undone: idempotent deletes, and `start` reconciles the daemons'
timelines with the project's branches (issue 17)."""

from __future__ import annotations

import json
import time
import uuid

from neonctl.engine.branches import reconcile
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.safekeeper.client import SafekeeperClient


def _held(p) -> set[str]:
    out = set(PageserverClient(p.pageserver_addr).status()["timelines"])
    for i, a in p.safekeeper_addrs().items():
        out |= set(SafekeeperClient(i, a).status()["timelines"])
    return out


def _orphan(p) -> str:
    """What a branch create killed between the daemons and project.json leaves: a timeline nobody names."""
    main = p.branch("main")
    tid = uuid.uuid4().hex
    info = PageserverClient.of(p).create_branch(tid, main.timeline_id, wait_for_lsn=0)
    for sk in SafekeeperClient.all_of(p).values():
        sk.create_timeline(tid, info["system_id"], info["pg_version"], info["start_lsn"])
    return tid


def test_start_deletes_orphans_and_spares_pending_operations(pg18, cli):
    orphan = _orphan(pg18)
    pending = _orphan(pg18)
    pg18.reload()
    pg18.config.pending_timelines[pending] = time.time()  # a reset under way recorded it
    pg18.save()
    try:
        assert {orphan, pending} <= _held(pg18)
        rc, _, err = cli("start", "-p", pg18.name)
        assert f"deleted timeline {orphan}" in err
        held = _held(pg18)
        assert orphan not in held and pending in held
        # once the grace is over, the pending one is a crashed operation's leftover
        res = reconcile(pg18, now=time.time() + 3600)
        assert res["orphans_deleted"] == [pending] and pending not in _held(pg18)
        pg18.reload()
        assert pending not in pg18.config.pending_timelines
        names = {b.timeline_id for b in pg18.config.branches.values()}
        assert _held(pg18) == names  # exactly the branches, nothing missing
    finally:
        pg18.reload()
        pg18.config.pending_timelines.pop(pending, None)
        pg18.save()


def test_interrupted_delete_is_finished_by_a_retry(pg18, cli):
    cli("branch", "create", "--name", "halfgone", "-p", pg18.name)
    tid = pg18.branch("halfgone").timeline_id
    for i, addr in pg18.safekeeper_addrs().items():  # the delete got this far before it was killed
        SafekeeperClient(i, addr).delete_timeline(tid)
    cli("branch", "delete", "halfgone", "-p", pg18.name)
    rows = json.loads(cli("branch", "list", "-o", "json", "-p", pg18.name)[1])
    assert "halfgone" not in {r["name"] for r in rows} and tid not in _held(pg18)


def test_start_after_a_killed_start_stops_the_untracked_postgres(pg18, cli):
    """A start killed after Postgres came up but before it recorded the compute leaves a Postgres no state
    file names; the next start stops it instead of running a second compute for the branch."""
    from neonctl.engine.compute.endpoint import _state_path, postgres_pid, read_state
    from neonctl.engine.process import pid_alive

    cli("branch", "create", "--name", "untracked", "-p", pg18.name)
    try:
        cli("endpoint", "start", "untracked", "-p", pg18.name)
        st = read_state(pg18, "untracked")
        first = postgres_pid(st.pgdata)
        _state_path(pg18, "untracked").unlink()  # as if the CLI died before saving it
        cli("endpoint", "start", "untracked", "-p", pg18.name)
        second = postgres_pid(read_state(pg18, "untracked").pgdata)
        assert second and second != first and not pid_alive(first)
    finally:
        cli("endpoint", "stop", "untracked", "-p", pg18.name, ok=False)
        cli("branch", "delete", "untracked", "--force", "-p", pg18.name)
