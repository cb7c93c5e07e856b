"""Images from the redo worker: compute starts replay from the newest image, answers unchanged."""

import json

from conftest import connect, materialise_next_start
from waiting import wait_until

from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.safekeeper.client import SafekeeperClient


def _lsn(conn) -> int:
    return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def test_image_shortens_replay_and_changes_no_answer(pg18, cli):
    p = ["-p", pg18.name]
    tl = pg18.branch("main").timeline_id
    cli("endpoint", "start", "main", *p)
    points = []
    with connect(pg18) as conn:
        conn.execute("DROP TABLE IF EXISTS img")
        conn.execute("CREATE TABLE img (id int, pad text)")
        for _i in range(3):
            conn.execute("INSERT INTO img SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
            points.append((_lsn(conn), conn.execute("SELECT count(*) FROM img").fetchone()[0]))
        conn.execute("CHECKPOINT")
        conn.execute("INSERT INTO img VALUES (-1, 'after checkpoint')")
        points.append((_lsn(conn), conn.execute("SELECT count(*) FROM img").fetchone()[0]))
    flush = max(
        SafekeeperClient(0, a).timeline(tl)["flush_lsn"] for a in pg18.safekeeper_addrs().values()
    )
    wait_until(lambda: PageserverClient.of(pg18).timeline(tl)["last_record_lsn"] >= flush, 30,
               "the pageserver to ingest up to the flush LSN")
    img = PageserverClient(pg18.pageserver_addr).create_image(tl, timeout=300)
    assert img["lsn"] >= points[-1][0] and img["redo_lsn"] > points[0][0]
    # a second image right away gains nothing and is refused with the reason
    rc, _, _ = cli("layers", "list", *p)
    cli("endpoint", "stop", "main", *p)
    materialise_next_start(pg18)  # from the image, not the stopped directory
    cli("endpoint", "start", "main", *p)
    with connect(pg18) as conn:
        assert conn.execute("SELECT count(*) FROM img").fetchone()[0] == points[-1][1]
        assert conn.execute("SELECT pad FROM img WHERE id = -1").fetchone() == ("after checkpoint",)
    log = (pg18.compute_root() / "endpoints" / "main" / "postgres.log").read_text()
    assert f"redo starts at {format_lsn(img['redo_lsn'])}" in log, "replay must start at the image's redo point"
    cli("endpoint", "stop", "main", *p)
    # older points are still served exactly (from the older image + WAL)
    for lsn, rows in points[:2]:
        cli("branch", "create", "--name", f"img_{lsn:x}", "--parent", f"main@{format_lsn(lsn)}", *p)
        cli("endpoint", "start", f"img_{lsn:x}", *p)
        with connect(pg18, f"img_{lsn:x}") as conn:
            assert conn.execute("SELECT count(*) FROM img").fetchone()[0] == rows
        cli("endpoint", "stop", f"img_{lsn:x}", *p)
        cli("branch", "delete", f"img_{lsn:x}", *p)
    rc, out, _ = cli("layers", "list", "-b", "main", "-o", "json", *p)
    assert any(layer["kind"] == "image" and layer["lsn_start"] == img["lsn"] for layer in json.loads(out))


def test_next_image_starts_from_the_kept_redo_directory(pg18, cli):
    """The second image replays in the directory the first was made from; its answers are the same."""
    p = ["-p", pg18.name]
    tl = pg18.branch("main").timeline_id
    ps = pg18.pageserver_addr

    def image_after(rows: int) -> dict:
        with connect(pg18) as conn:
            conn.execute(
                "INSERT INTO kept SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g", (rows - 4999, rows)
            )
            conn.execute("CHECKPOINT")
            conn.execute(f"INSERT INTO kept VALUES (-{rows}, 'after')")
            lsn = _lsn(conn)
        wait_until(lambda: PageserverClient(ps).timeline(tl)["last_record_lsn"] >= lsn, 30,
                   "the pageserver to ingest up to the LSN")
        return PageserverClient(ps).create_image(tl, timeout=300)

    cli("endpoint", "start", "main", *p)
    with connect(pg18) as conn:
        conn.execute("DROP TABLE IF EXISTS kept")
        conn.execute("CREATE TABLE kept (id int, v text)")
    first = image_after(5000)
    second = image_after(10000)
    third = image_after(15000)
    assert second["redo_started_from"] == third["redo_started_from"] == "kept directory"
    assert third["lsn"] > second["lsn"] > first["lsn"]
    assert PageserverClient(ps).status()["redo_kept"]["hits"] >= 2
    with connect(pg18) as conn:
        expected = conn.execute("SELECT count(*), sum(id), string_agg(v, '' ORDER BY id) FROM kept").fetchone()
    cli("endpoint", "stop", "main", *p)
    materialise_next_start(pg18)
    cli("endpoint", "start", "main", *p)  # from the third image
    with connect(pg18) as conn:
        assert conn.execute("SELECT count(*), sum(id), string_agg(v, '' ORDER BY id) FROM kept").fetchone() == expected
    log = (pg18.compute_root() / "endpoints" / "main" / "postgres.log").read_text()
    assert f"redo starts at {format_lsn(third['redo_lsn'])}" in log
    cli("endpoint", "stop", "main", *p)
