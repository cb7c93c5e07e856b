"""Fault injection: kill -9 the compute mid-write; stop the safekeeper under a commit."""

import os
import signal

from conftest import BlockedCommit, Writer, assert_all_present
from waiting import wait_until

from neonctl.engine.compute.endpoint import postgres_pid, read_state


def test_kill9_compute_loses_no_acknowledged_insert(pg18, cli):
    cli("endpoint", "start", "main", "-p", pg18.name)
    w = Writer(pg18, "acked")
    wait_until(lambda: len(w.acked) > 100, 30, "the workload to commit rows")
    pid = postgres_pid(read_state(pg18, "main").pgdata)
    os.kill(pid, signal.SIGKILL)
    # the signal is delivered at once, the process is gone a moment later: the next start must see it gone
    wait_until(lambda: postgres_pid(read_state(pg18, "main").pgdata) is None, 10, "the compute to die")
    acked = w.finish()  # the compute died under it
    assert len(acked) > 50, "the workload should have committed rows before the crash"
    rc, out, err = cli("endpoint", "start", "main", "-p", pg18.name)
    assert "crashed" in err
    assert_all_present(pg18, "acked", acked)
    cli("endpoint", "stop", "main", "-p", pg18.name)


def test_commit_waits_while_safekeeper_is_down(pg18, cli):
    cli("endpoint", "start", "main", "-p", pg18.name)
    c = BlockedCommit(pg18, "waits")
    pg18.daemon("sk1").stop(immediate=True)
    c.start()
    try:
        c.assert_waiting("a commit must not succeed while the only safekeeper is down")
    finally:
        cli("start", "-p", pg18.name)
    c.assert_committed("the commit must resume once the safekeeper is back")
    cli("endpoint", "stop", "main", "-p", pg18.name)
    cli("endpoint", "start", "main", "-p", pg18.name)
    c.assert_kept()
    cli("endpoint", "stop", "main", "-p", pg18.name)
