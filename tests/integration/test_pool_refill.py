"""The pool's background refill (issue 16): with the pool empty while a branch runs, the pageserver writes the
busy timeline's newest image into the pool, so the next start - a branch of the running parent - is rebuilt
from it instead of restored in full. A project of its own: its pageserver refills images of 1 MiB and up."""

from __future__ import annotations

from conftest import connect, image_of_running_branch, start_how
from waiting import wait_until

from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import directory_pool
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.project import load_project


def _refilled(project) -> list[dict]:
    root = directory_pool(project)
    return [r for r in (dir_pool.read_record(s) for s in dir_pool.slots(root)) if r and "from_image" in r]


def test_an_empty_pool_is_refilled_from_the_busy_branch_and_the_next_start_rebuilds(cli, monkeypatch):
    monkeypatch.setenv("NEONCTL_POOL_REFILL_MIN_MB", "1")  # for the daemons this project starts
    cli("init", "--name", "prefill")
    project = load_project("prefill")
    p = ["-p", "prefill"]
    try:
        cli("project", "set", "--suspend-timeout", "0", "--pool-size", "2", *p)
        cli("start", *p)
        cli("endpoint", "start", "main", *p)
        with connect(project, "main") as conn:
            conn.execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 30000) g")
        image = image_of_running_branch(project, "main")
        # (initdb's image may have been refilled first: the new image is newer, so it is refilled too)
        rec = wait_until(lambda: [r for r in _refilled(project) if r["from_image"] == image["lsn"]], timeout=60,
                         what="a directory of the new image in the pool")[0]
        assert rec["timeline_id"] == project.branch("main").timeline_id
        with connect(project, "main") as conn:
            conn.execute("UPDATE big SET v = 'after the image' WHERE id % 7 = 0")
            want = conn.execute("SELECT count(*), sum(hashtext(v)) FROM big").fetchone()
        cli("branch", "create", "--name", "kid", *p)
        assert start_how(cli, project, "kid") == "rebuilt"  # from the refilled image, compared with a full restore
        with connect(project, "kid") as conn:
            assert conn.execute("SELECT count(*), sum(hashtext(v)) FROM big").fetchone() == want
        cli("endpoint", "stop", "kid", *p)
        # a pool of size 0 is never refilled
        cli("project", "set", "--pool-size", "0", *p)
        assert dir_pool.read_limits(directory_pool(project))[0] == 0
    finally:
        delete_project(load_project("prefill"))
