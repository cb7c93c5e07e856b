"""Incremental rebuild (issue 16): a start that cannot reuse the stopped directory as it is rewrites only the
pages the directory's history changed since the image, and replays the WAL from there.

The suite runs the pageserver with NEONCTL_VERIFY_REBUILD (conftest), so every rebuild here is also compared
with a full restore of the same image, file by file and byte by byte, before Postgres replays; a difference
fails the start. On top of that oracle, every start is checked against the rows committed on its branch."""

from __future__ import annotations

import random
import re
from contextlib import contextmanager

import pytest
from conftest import connect, image_of_running_branch, pool_size, start_how
from waiting import wait_until

from neonctl.engine import client
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.process import pid_alive
from neonctl.engine.safekeeper.client import flush_lsn


def _digest(project, branch: str) -> tuple:
    with connect(project, branch) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'rb%' ORDER BY relname")]
        out = []
        for t in tables:
            out.append((t, *conn.execute(f"SELECT count(*), coalesce(sum(hashtext(v)), 0) FROM {t}").fetchone()))
        # through the index as well (an index page out of date would show here)
        conn.execute("SET enable_seqscan = off")
        if "rb1" in tables:
            out.append(conn.execute("SELECT count(*) FROM rb1 WHERE id >= -1000000000").fetchone())
        return tuple(out)


def test_switching_between_siblings_rewrites_only_what_changed(pg18, cli):
    with pool_size(cli, pg18, 1):  # one kept directory: each start rebuilds the last stop's
        _switch_between_siblings(pg18, cli, ["-p", pg18.name])


def _switch_between_siblings(pg18, cli, p):
    cli("branch", "create", "--name", "rbase", *p)
    cli("endpoint", "start", "rbase", *p)
    with connect(pg18, "rbase") as conn:
        conn.execute("CREATE TABLE rb1 (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO rb1 SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        conn.execute("CREATE TABLE rb2 (id int, v text)")
        conn.execute("INSERT INTO rb2 SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
    image_of_running_branch(pg18, "rbase")
    base = _digest(pg18, "rbase")
    cli("endpoint", "stop", "rbase", *p)
    for name in ("rc1", "rc2"):
        cli("branch", "create", "--name", name, "--parent", "rbase", *p)
    assert start_how(cli, pg18, "rc1") == "reused"  # the parent's clean stop is exactly its branch point
    with connect(pg18, "rc1") as conn:
        conn.execute("UPDATE rb1 SET v = 'c1' WHERE id % 50 = 0")  # pages that are in the image
        conn.execute("DELETE FROM rb2 WHERE id > 4000")
        conn.execute("VACUUM rb2")  # truncates the file below the image's size
        conn.execute("CREATE TABLE rb3 (id int, v text)")  # a relation the image does not have
        conn.execute("INSERT INTO rb3 VALUES (1, 'only in rc1')")
        conn.execute("SELECT count(*) FROM rb1")  # sets hint bits: logged (wal_log_hints), so rewritten too
    c1 = _digest(pg18, "rc1")
    assert c1 != base
    cli("endpoint", "stop", "rc1", *p)
    # rc1's directory has been running since rbase's compute started, before the image: a hint bit set then
    # need not be in the WAL, so it is not trusted for a rebuild (this ordering once made the oracle fail)
    assert start_how(cli, pg18, "rc2") == "full"
    assert _digest(pg18, "rc2") == base  # none of rc1's changes
    with connect(pg18, "rc2") as conn:
        conn.execute("DROP TABLE rb2")  # a relation the image has, gone here
        conn.execute("INSERT INTO rb1 VALUES (-1, 'c2')")
    c2 = _digest(pg18, "rc2")
    cli("endpoint", "stop", "rc2", *p)
    assert start_how(cli, pg18, "rc1") == "rebuilt"
    assert _digest(pg18, "rc1") == c1
    cli("endpoint", "stop", "rc1", *p)
    assert start_how(cli, pg18, "rc2") == "rebuilt"
    assert _digest(pg18, "rc2") == c2
    cli("endpoint", "stop", "rc2", *p)


def test_random_switches_match_the_committed_rows(pg18, cli):
    """A randomised walk over three siblings and their writes; the oracle compares every rebuild with a
    full restore, and each start must show exactly what its branch committed."""
    p = ["-p", pg18.name]
    rng = random.Random(16)
    cli("branch", "create", "--name", "rrand", *p)
    cli("endpoint", "start", "rrand", *p)
    with connect(pg18, "rrand") as conn:
        conn.execute("CREATE TABLE rb1 (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO rb1 SELECT g, md5(g::text) FROM generate_series(1, 10000) g")
    image_of_running_branch(pg18, "rrand")
    cli("endpoint", "stop", "rrand", *p)
    names = ["rr1", "rr2", "rr3"]
    for n in names:
        cli("branch", "create", "--name", n, "--parent", "rrand", *p)
    expected = {}
    how = []
    for step in range(8):
        b = rng.choice(names)
        how.append(start_how(cli, pg18, b))
        if b in expected:
            assert _digest(pg18, b) == expected[b], (step, b)
        with connect(pg18, b) as conn:
            lo = rng.randrange(1, 9000)
            op = rng.choice(["update", "delete", "insert", "vacuum"])
            if op == "update":
                conn.execute(f"UPDATE rb1 SET v = '{b}{step}' WHERE id BETWEEN {lo} AND {lo + 300}")
            elif op == "delete":
                conn.execute(f"DELETE FROM rb1 WHERE id BETWEEN {lo} AND {lo + 500}")
            elif op == "insert":
                conn.execute(f"INSERT INTO rb1 SELECT g, '{b}' FROM generate_series({10000 + step * 1000},"
                             f" {10000 + step * 1000 + 400}) g")
            else:
                conn.execute(f"DELETE FROM rb1 WHERE id > {9000 + step}")
                conn.execute("VACUUM rb1")
        expected[b] = _digest(pg18, b)
        cli("endpoint", "stop", b, *p)
    assert "rebuilt" in how, how


@contextmanager
def stopped_after(cli, project, *branches: str):
    """The branches' endpoints are stopped after the block, however it ends."""
    try:
        yield
    finally:
        for b in branches:
            cli("endpoint", "stop", b, "-p", project.name, ok=False)


def _siblings_with_writes(project, cli, base: str, names: tuple[str, str]) -> dict:
    """A parent with data and an image, stopped; two children, each started once and written to."""
    p = ["-p", project.name]
    cli("branch", "create", "--name", base, *p)
    cli("endpoint", "start", base, *p)
    with connect(project, base) as conn:
        conn.execute("CREATE TABLE rb1 (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO rb1 SELECT g, md5(g::text) FROM generate_series(1, 8000) g")
    image_of_running_branch(project, base)
    cli("endpoint", "stop", base, *p)
    digests = {}
    for n in names:
        cli("branch", "create", "--name", n, "--parent", base, *p)
    for i, n in enumerate(names):
        start_how(cli, project, n)
        with connect(project, n) as conn:
            conn.execute(f"UPDATE rb1 SET v = '{n}' WHERE id % {7 + i} = 0")
            conn.execute(f"INSERT INTO rb1 SELECT g, '{n}' FROM generate_series(9000, {9200 + i * 100}) g")
        digests[n] = _digest(project, n)
        cli("endpoint", "stop", n, *p)
    return digests


def test_rebuild_after_compaction_and_gc(pg18, cli):
    """Compaction rewrites the delta layers the rebuild reads its history from, and GC drops what is below its
    horizon: the rebuild still rewrites exactly the changed pages (the oracle compares it with a full restore)."""
    a, b = "rgc1", "rgc2"
    # one kept directory: each start is rebuilt from the other sibling's last stop (with more, a branch's own
    # clean stop would be reused as it is, depending on what earlier tests left in the pool)
    with pool_size(cli, pg18, 1):
        want = _siblings_with_writes(pg18, cli, "rgcbase", (a, b))
        ps = PageserverClient.of(pg18)
        for name in ("rgcbase", a, b):
            tl = pg18.branch(name).timeline_id
            ps.checkpoint(tl, compact=True, wait_for_lsn=flush_lsn(pg18, tl))
        ps.gc([pg18.branch(n).timeline_id for n in ("rgcbase", a, b)])
        for n in (a, b, a):
            assert start_how(cli, pg18, n) == "rebuilt"
            assert _digest(pg18, n) == want[n]
            cli("endpoint", "stop", n, "-p", pg18.name)


@pytest.mark.daemon_errors(".")  # the pageserver dies mid-request; the CLI's side logs the broken stream
def test_pageserver_killed_midway_through_a_rebuild(pg18, cli):
    """A rebuild forgets the directory's record before its first write, so a directory left half rewritten by a
    crash is never taken for a known state again: the next start restores in full and shows the right rows."""
    a, b = "rcr1", "rcr2"
    with pool_size(cli, pg18, 1):  # a's start is rebuilt from b's stop, not reused
        want = _siblings_with_writes(pg18, cli, "rcrbase", (a, b))
        ps = PageserverClient.of(pg18)
        pid = pg18.daemon("pageserver").pid()
        client.set_failpoints("pageserver", pg18.pageserver_addr, {"ps-rebuild-midway": "crash"})
        try:
            rc, _, err = cli("endpoint", "start", a, "-p", pg18.name, ok=False)
            assert rc != 0, err  # the start fails: its pageserver died under it
            wait_until(lambda: not pid_alive(pid), 10, "the pageserver to die at the fault point")
        finally:
            if pid_alive(pid):  # the fault point was not reached: it must not hit a later test
                client.set_failpoints("pageserver", pg18.pageserver_addr, {})
            cli("start", "-p", pg18.name)  # a new pageserver, without the fault point
        assert ps.status()["timelines"]
        assert start_how(cli, pg18, a) == "full"
        assert _digest(pg18, a) == want[a]
        cli("endpoint", "stop", a, "-p", pg18.name)
        assert start_how(cli, pg18, b) == "rebuilt"  # and a clean stop is a known state again
        assert _digest(pg18, b) == want[b]
        cli("endpoint", "stop", b, "-p", pg18.name)


def test_pages_the_replay_rewrites_whole_are_left_to_it(pg18, cli):
    """Reset of a running branch while its parent rewrote every page: the pages whose first record after the
    image's redo point is a full-page image are left as the stopped directory had them (the replay overwrites
    them); the oracle proves each one's first record after the redo point does, and compares every other
    byte with a full restore. The rows are the parent's."""
    p = ["-p", pg18.name]
    with pool_size(cli, pg18, 1), stopped_after(cli, pg18, "rfk", "rfp"):  # the reset restarts from its own stop
        cli("branch", "create", "--name", "rfp", *p)
        cli("endpoint", "start", "rfp", *p)
        with connect(pg18, "rfp") as conn:
            conn.execute("CREATE TABLE rb1 (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO rb1 SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
        image_of_running_branch(pg18, "rfp")
        with connect(pg18, "rfp") as conn:
            conn.execute("UPDATE rb1 SET v = 'a'")  # every page, first touched after the image: page images
        cli("branch", "create", "--name", "rfk", "--parent", "rfp", *p)
        cli("endpoint", "start", "rfk", *p)
        with connect(pg18, "rfk") as conn:
            conn.execute("UPDATE rb1 SET v = 'k' WHERE id % 10 = 0")
        with connect(pg18, "rfp") as conn:
            conn.execute("UPDATE rb1 SET v = 'b' WHERE id % 3 = 0")
            want = _digest(pg18, "rfp")
        _, _, err = cli("branch", "reset", "rfk", "--parent", *p)
        m = re.search(r"directory: (\d+) changed page\(s\) rewritten from the image, (\d+) left to the replay", err)
        assert m, err
        rewritten, left = int(m.group(1)), int(m.group(2))
        assert left > 50, err  # rb1's pages, all first touched by a page image after the redo point
        assert rewritten < left, err
        assert _digest(pg18, "rfk") == want
        with connect(pg18, "rfk") as conn:
            assert conn.execute("SELECT count(*) FROM rb1 WHERE v = 'k'").fetchone()[0] == 0
