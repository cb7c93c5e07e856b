"""`branch reset --parent` and `branch restore`: a branch takes another point's content in place, keeping its
name and its endpoint's port; its old state survives as a branch; bad input changes nothing."""

import json

import pytest
from conftest import connect, insert_lsn, new_table, running_main

from neonctl.cli import main
from neonctl.engine.compute.endpoint import read_state
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient


def _ids(project, branch):
    with connect(project, branch) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM rr ORDER BY id")]


@pytest.fixture(scope="module")
def rr(pg18):
    """main (running) with rows 1..3, and branch rr_dev off it (running) with its own row 100."""
    with running_main(pg18):
        with connect(pg18) as conn:
            new_table(conn, "rr", "id int PRIMARY KEY")
            conn.execute("INSERT INTO rr VALUES (1), (2), (3)")
        assert main(["branch", "create", "--name", "rr_dev", "--endpoint", "-p", pg18.name, "-o", "json"]) == 0
        with connect(pg18, "rr_dev") as conn:
            conn.execute("INSERT INTO rr VALUES (100)")
        with connect(pg18) as conn:
            conn.execute("INSERT INTO rr VALUES (4)")  # main moves on after the branch point
        yield pg18


def test_reset_to_parent_keeps_name_and_port_and_preserves_old_state(rr, cli):
    port = read_state(rr, "rr_dev").port
    rc, out, err = cli("branch", "reset", "rr_dev", "--parent", "--preserve-under-name", "rr_dev_before",
                       "-o", "json", "-p", rr.name)
    res = json.loads(out)
    assert res["branch"]["name"] == "rr_dev" and res["branch"]["parent"] == "main"
    assert res["preserved_branch"]["name"] == "rr_dev_before"
    assert read_state(rr, "rr_dev").port == port, "the endpoint must come back on the same port"
    assert _ids(rr, "rr_dev") == [1, 2, 3, 4], "reset = the parent's latest state; the branch's own row is gone"
    with connect(rr, "rr_dev") as conn:  # and the new compute is the writer of the new history
        conn.execute("INSERT INTO rr VALUES (101)")
    assert _ids(rr, "rr_dev") == [1, 2, 3, 4, 101]
    # the old state is a readable branch of its own, with the old branch point
    cfg = json.loads((rr.dir / "project.json").read_text())["branches"]
    assert cfg["rr_dev_before"]["parent"] == "main" and cfg["rr_dev_before"]["parent_lsn"] < cfg["rr_dev"]["parent_lsn"]
    cli("endpoint", "start", "rr_dev_before", "-p", rr.name)
    try:
        assert _ids(rr, "rr_dev_before") == [1, 2, 3, 100]
    finally:
        cli("endpoint", "stop", "rr_dev_before", "-p", rr.name)


def test_restore_from_parent_then_from_own_history(rr, cli):
    port = read_state(rr, "rr_dev").port
    with connect(rr, "rr_dev") as conn:
        conn.execute("INSERT INTO rr VALUES (200)")
    with connect(rr) as conn:
        conn.execute("INSERT INTO rr VALUES (5)")
    # ^parent: the parent's head
    rc, out, err = cli("branch", "restore", "rr_dev", "^parent", "-o", "json", "-p", rr.name)
    res = json.loads(out)
    assert set(res) == {"restored_branch", "backup_branch"}
    backup = res["backup_branch"]["name"]
    assert backup.startswith("rr_dev_old_") and res["restored_branch"]["parent"] == "main"
    assert read_state(rr, "rr_dev").port == port
    assert _ids(rr, "rr_dev") == [1, 2, 3, 4, 5]
    # ^self@LSN: exactly the rows committed by then
    with connect(rr, "rr_dev") as conn:
        conn.execute("INSERT INTO rr VALUES (300)")
        lsn = insert_lsn(conn)
        conn.execute("INSERT INTO rr VALUES (400)")
        conn.execute("DELETE FROM rr WHERE id = 1")
    rc, out, err = cli("branch", "restore", "rr_dev", "--source", f"^self@{format_lsn(lsn)}",
                       "--preserve-under-name", "rr_dev_bad", "-o", "json", "-p", rr.name)
    res = json.loads(out)
    assert res["backup_branch"]["name"] == "rr_dev_bad"
    assert res["restored_branch"]["parent"] == "rr_dev_bad", "the backup becomes the parent, as in Neon"
    assert res["restored_branch"]["parent_lsn"] == format_lsn(lsn)
    assert read_state(rr, "rr_dev").port == port
    assert _ids(rr, "rr_dev") == [1, 2, 3, 4, 5, 300]
    # a branch without a running endpoint is restored without starting one; tables show both sections
    cli("endpoint", "stop", "rr_dev", "-p", rr.name)
    rc, out, _ = cli("branch", "restore", "rr_dev", f"^parent@{format_lsn(lsn)}", "--preserve-under-name",
                     "rr_dev_bad2", "-p", rr.name)
    assert "Restored Branch:" in out and "Backup Branch:" in out and "rr_dev_bad2" in out
    assert read_state(rr, "rr_dev") is None
    cfg = json.loads((rr.dir / "project.json").read_text())["branches"]
    assert cfg["rr_dev"]["parent"] == "rr_dev_bad" and cfg["rr_dev_bad2"]["parent"] == "rr_dev_bad"
    assert cfg["rr_dev"]["parent_lsn"] == lsn


def _err(cli, *args):
    rc, out, err = cli(*args, ok=False)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_is_one_error_line_and_changes_nothing(rr, cli):
    p = ["-p", rr.name]
    before = (rr.dir / "project.json").read_text()
    st = read_state(rr, "main")
    timelines = set(PageserverClient(rr.pageserver_addr).status()["timelines"])
    assert "root branch" in _err(cli, "branch", "reset", "main", "--parent", *p)
    assert "root branch" in _err(cli, "branch", "restore", "main", "^parent", *p)
    assert "--parent" in _err(cli, "branch", "reset", "rr_dev", *p)
    assert "in the future" in _err(cli, "branch", "restore", "rr_dev", "^self@2999-01-01T00:00:00Z", *p)
    assert "does not exist" in _err(cli, "branch", "restore", "rr_dev", "nope", *p)
    assert "invalid source" in _err(cli, "branch", "restore", "rr_dev", "^grandparent", *p)
    assert "invalid point" in _err(cli, "branch", "restore", "rr_dev", "^self@yesterday", *p)
    assert "changes nothing" in _err(cli, "branch", "restore", "rr_dev", "^self", *p)
    assert "past the head" in _err(cli, "branch", "restore", "rr_dev", "^self@FF/0", *p)
    assert "already exists" in _err(cli, "branch", "restore", "rr_dev", "^parent", "--preserve-under-name", "main", *p)
    assert "already exists" in _err(cli, "branch", "reset", "rr_dev", "--parent", "--preserve-under-name", "main", *p)
    assert "invalid branch name" in _err(
        cli, "branch", "reset", "rr_dev", "--parent", "--preserve-under-name", "a/b", *p
    )
    assert "give the source once" in _err(cli, "branch", "restore", "rr_dev", *p)
    assert (rr.dir / "project.json").read_text() == before
    # a branch whose history has children is only reset if its old state is kept for them
    cli("branch", "create", "--name", "rr_child", "--parent", "rr_dev", *p)
    before = (rr.dir / "project.json").read_text()
    assert "child branches" in _err(cli, "branch", "reset", "rr_dev", "--parent", *p)
    assert (rr.dir / "project.json").read_text() == before
    cli("branch", "delete", "rr_child", *p)
    # no timeline was created or deleted, and main's endpoint was never touched
    now = set(PageserverClient(rr.pageserver_addr).status()["timelines"])
    assert now == timelines
    assert read_state(rr, "main") == st


def test_reset_of_a_running_branch_rebuilds_from_its_own_stopped_directory(rr, cli):
    """The old history is dropped only after the restart: the restart can still rebuild from the directory the
    branch's compute just left (only what differs is rewritten) instead of restoring the database in full."""
    p = ["-p", rr.name]
    cli("branch", "create", "--name", "rr_re", "--endpoint", *p)
    try:
        old_tid = rr.branch("rr_re").timeline_id
        with connect(rr, "rr_re") as conn:
            conn.execute("INSERT INTO rr VALUES (200)")
        log = rr.dir / "pageserver" / "pageserver.log"
        before = log.stat().st_size
        cli("branch", "reset", "rr_re", "--parent", *p)
        with open(log) as f:
            f.seek(before)
            plans = [line for line in f if "pages to rewrite per kept directory" in line]
        # the restart weighed the directory rr_re's compute left, whose history still existed (it is rebuilt
        # from it unless another reason rules it out, e.g. an image made in between)
        assert plans and "the timeline it ran on is gone" not in plans[-1], plans
        assert _ids(rr, "rr_re") == _ids(rr, "main")
        assert old_tid not in PageserverClient.of(rr).status()["timelines"]  # and the old history is gone
    finally:
        cli("branch", "delete", "rr_re", "--force", *p)


def test_restore_stops_a_compute_older_than_the_new_image_at_once(rr, cli):
    """A running compute that started before the image the new point replays from leaves a directory no
    rebuild can use: it is stopped without a shutdown checkpoint (immediate), and the restored branch still
    shows exactly the rows committed at the point - nothing acknowledged depended on that checkpoint."""
    from conftest import image_of_running_branch  # noqa: PLC0415

    p = ["-p", rr.name]
    cli("branch", "create", "--name", "rr_imm", "--endpoint", *p)
    try:
        with connect(rr, "rr_imm") as conn:
            conn.execute("INSERT INTO rr VALUES (300)")
        image_of_running_branch(rr, "rr_imm")  # the compute keeps running from before this image
        with connect(rr, "rr_imm") as conn:
            conn.execute("INSERT INTO rr VALUES (301)")
            at = insert_lsn(conn)
            conn.execute("INSERT INTO rr VALUES (302)")
        want = sorted({*_ids(rr, "main"), 300, 301})
        _, _, err = cli("branch", "restore", "rr_imm", f"^self@{format_lsn(at)}", *p)
        assert "(immediate: its directory is older than the new point's image)" in err, err
        assert _ids(rr, "rr_imm") == want
        # a restart at a point the running compute's directory can still be rebuilt to keeps the clean stop
        _, _, err = cli("branch", "reset", "rr_imm", "--parent", *p)
        assert "stopping the endpoint of 'rr_imm'" in err and "immediate" not in err, err
    finally:
        cli("branch", "delete", "rr_imm", "--force", *p)
