"""GC and the PITR window: history outside it goes, branch points and time travel inside it stay."""

import json
import time

import pytest
from conftest import connect
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import load_project

TINY_WINDOW = {"gc_horizon": 0, "pitr_interval": 2.0, "gc_period": 0, "checkpoint_distance": 256 * 1024,
               "image_creation_threshold": 1000}


@pytest.fixture(scope="module")
def gp():
    assert cli_main(["init", "--name", "gcp", "-o", "json"]) == 0
    p = load_project("gcp")
    (p.dir / "pageserver" / "pageserver.json").write_text(json.dumps(TINY_WINDOW))
    assert cli_main(["start", "-p", "gcp", "-o", "json"]) == 0
    yield p
    delete_project(p)


def _lsn(conn):
    return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def _image(p, tl):
    with connect(p) as conn:  # everything the compute has flushed (its CHECKPOINT included)
        flush = int(conn.execute("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn").fetchone()[0])
    wait_until(lambda: PageserverClient.of(p).timeline(tl)["last_record_lsn"] >= flush - 128, 30,
               "the pageserver to ingest up to the flush LSN")
    return PageserverClient(p.pageserver_addr).create_image(tl, timeout=300)


def test_gc_trims_history_but_keeps_branch_points(gp, cli):
    p = ["-p", "gcp"]
    tl = gp.branch("main").timeline_id
    cli("endpoint", "start", "main", *p)
    with connect(gp) as conn:
        conn.execute("CREATE TABLE g (id int, pad text)")
        for _ in range(6):
            conn.execute("INSERT INTO g SELECT g, repeat('y', 200) FROM generate_series(1, 20000) g")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
    img1 = _image(gp, tl)
    with connect(gp) as conn:
        conn.execute("INSERT INTO g SELECT g, repeat('w', 200) FROM generate_series(1, 20000) g")
        early_lsn, early_rows = _lsn(conn), conn.execute("SELECT count(*) FROM g").fetchone()[0]
    cli("branch", "create", "--name", "keepme", "--parent", f"main@{format_lsn(early_lsn)}", *p)
    with connect(gp) as conn:
        conn.execute("SELECT pg_switch_wal()")
        for _ in range(4):
            conn.execute("INSERT INTO g SELECT g, repeat('z', 200) FROM generate_series(1, 20000) g")
        conn.execute("CHECKPOINT")
        conn.execute("INSERT INTO g VALUES (-1, 'tail')")
        final_rows = conn.execute("SELECT count(*) FROM g").fetchone()[0]
    img = _image(gp, tl)
    assert img1["lsn"] < early_lsn < img["lsn"]
    time.sleep(2.5)  # everything so far is now older than the 2 s PITR window
    rc, out, _ = cli("gc", "--dry-run", "-o", "json", *p)
    dry = next(r for r in json.loads(out) if r["branch"] == "main")
    assert dry["dry_run"] and dry["bytes_freed"] > 0, (dry, img)
    segs_before = sorted((gp.dir / "pageserver" / "timelines" / tl / "wal").iterdir())
    rc, out, _ = cli("gc", "-o", "json", *p)
    res = next(r for r in json.loads(out) if r["branch"] == "main")
    # initdb's image and the WAL/deltas below the first image are gone; image 1 stays for the branch point
    assert res["images_removed"] and res["wal_segments_removed"] and res["deltas_removed"], (
        res["wal_kept_from"],
        res["retained_points"],
        img1["redo_lsn"],
        img1["lsn"],
        sorted(p.name for p in (gp.dir / "pageserver" / "timelines" / tl / "wal").iterdir()),
    )
    assert not any(str(img1["layers"][0]) == n for n in res["images_removed"])
    assert format_lsn(early_lsn) in res["retained_points"]
    assert len(sorted((gp.dir / "pageserver" / "timelines" / tl / "wal").iterdir())) <= len(segs_before)
    # the explorer's gc view shows what this run removed, file by file, from the layer index
    sql = "SELECT kind, file, bytes, cutoff FROM gc WHERE run = 'last' AND branch = 'main'"
    rc, out, _ = cli("layers", "query", sql, "-o", "json", *p)
    last = json.loads(out)
    removed = {(r["kind"], r["file"]) for r in last}
    assert removed == ({("image", n) for n in res["images_removed"]} | {("delta", n) for n in res["deltas_removed"]}
                       | {("wal", f"segment {s}") for s in res["wal_segments_removed"]}), (last, res)
    assert {r["cutoff"] for r in last} == {parse_lsn(res["cutoff"])}
    assert all(r["bytes"] > 0 for r in last)
    # the branch point below the cutoff still materialises exactly
    cli("endpoint", "start", "keepme", *p)
    with connect(gp, "keepme") as conn:
        assert conn.execute("SELECT count(*) FROM g").fetchone()[0] == early_rows
    cli("endpoint", "stop", "keepme", *p)
    # the head still materialises exactly, from the image
    cli("endpoint", "stop", "main", *p)
    cli("endpoint", "start", "main", *p)
    with connect(gp) as conn:
        assert conn.execute("SELECT count(*) FROM g").fetchone()[0] == final_rows
    # a new branch below the cutoff is refused, naming the oldest point kept
    rc, _, err = cli(
        "branch", "create", "--name", "tooold", "--parent", f"main@{format_lsn(early_lsn + 200000)}", *p, ok=False
    )
    assert rc != 0 and "below the GC cutoff" in err and "oldest point kept" in err
    assert "tooold" not in json.loads((gp.dir / "project.json").read_text())["branches"]
    # the cutoff only moves forward: a second GC keeps at least the same cutoff
    rc, out, _ = cli("gc", "-o", "json", *p)
    res2 = next(r for r in json.loads(out) if r["branch"] == "main")
    assert res2["cutoff"] == res["cutoff"] or int(res2["cutoff"].split("/")[1], 16) >= 0
    cli("endpoint", "stop", "main", *p)
