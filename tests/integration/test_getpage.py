"""GetPage@LSN through `neonctl page get`: the page Postgres had at each LSN, from an image or replayed."""

from __future__ import annotations

import json

from conftest import connect
from waiting import wait_until

from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver.client import PageserverClient


def _lsn(conn) -> int:
    return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def _items(conn, page: bytes | None = None) -> list[tuple]:
    """Line pointers and tuple data of block 0 of gp (hint bits left out: reads set them without WAL)."""
    src = "get_raw_page('gp', 0)" if page is None else "%s::bytea"
    return conn.execute(f"SELECT lp, lp_off, lp_len, t_xmin, t_data FROM heap_page_items({src}) ORDER BY lp",
                        None if page is None else (page,)).fetchall()


def _wait_ingested(p, lsn: int) -> None:
    tl = p.branch("main").timeline_id
    wait_until(lambda: PageserverClient.of(p).timeline(tl)["last_record_lsn"] >= lsn, 30,
               "the pageserver to ingest up to the LSN")


def test_page_get_returns_the_page_at_each_lsn(pg18, cli, tmp_path):
    p = ["-p", pg18.name]
    cli("endpoint", "start", "main", *p)
    points = []
    with connect(pg18) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        conn.execute("DROP TABLE IF EXISTS gp")
        conn.execute("CREATE TABLE gp (id int, v text)")
        for i in range(4):
            conn.execute("INSERT INTO gp SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                         (i * 10 + 1, (i + 1) * 10))
            if i == 2:
                conn.execute("DELETE FROM gp WHERE id % 3 = 0")
            points.append((_lsn(conn), _items(conn)))
        head = _lsn(conn)
    _wait_ingested(pg18, head)
    with connect(pg18) as conn:
        for lsn, expected in points:
            dump = tmp_path / f"{lsn:x}.page"
            _, out, _ = cli("page", "get", "gp", "0", "--lsn", format_lsn(lsn), "--dump", dump, "-o", "json", *p)
            res = json.loads(out)
            assert res["page"]["exists"] and res["page"]["source"] == "postgres redo"
            page = dump.read_bytes()
            assert len(page) == 8192
            assert _items(conn, page) == expected, f"page at {format_lsn(lsn)} differs from what the compute had"
            assert res["page"]["header"]["pd_lower"] == 24 + 4 * len(expected)

        # the table's block 1 never existed; a table-less relation neither
        rc, out, _ = cli("page", "get", "gp", "1", *p)
        assert "the block does not exist there" in out

    # after an image (CHECKPOINT first), an unchanged page comes straight from the image layer
    with connect(pg18) as conn:
        conn.execute("CHECKPOINT")
        before = _items(conn)
        head = _lsn(conn)
    _wait_ingested(pg18, head)
    img = PageserverClient.of(pg18).create_image(pg18.branch("main").timeline_id, timeout=300)  # at the head
    _, out, _ = cli("page", "get", "gp", "0", "--dump", tmp_path / "img.page", "-o", "json", *p)
    res = json.loads(out)
    assert res["page"]["source"] == "image layer", (hex(img["lsn"]), res["page"], res["versions"][:2])
    assert res["page"]["lsn"] == format_lsn(img["lsn"])
    assert res["versions"][0] == {"lsn": format_lsn(img["lsn"]), "will_init": True, "kind": "image", "length": 8192,
                                  "page_lsn": res["page"]["header"]["pd_lsn"]}
    with connect(pg18) as conn:
        assert _items(conn, (tmp_path / "img.page").read_bytes()) == before
    _, out, _ = cli("page", "get", "gp", "0", "--versions-only", "-o", "json", *p)
    assert "page" not in json.loads(out) and json.loads(out)["versions"]
    cli("endpoint", "stop", "main", *p)


def test_page_get_bad_input_is_one_line_and_writes_nothing(pg18, cli, tmp_path):
    p = ["-p", pg18.name]
    cases = [
        (["1663/5/1259", "0", "--fork", "bogus"], "invalid fork 'bogus'"),
        (["1663/5/1259", "4294967295"], "invalid block number 4294967295"),
        (["1663/5/1259", "0", "--lsn", "0/XYZ"], "invalid LSN"),
        (["1663/5/1259", "0", "--dump", tmp_path / "no" / "such" / "dir.page"], "does not exist"),
        (["1663/5/1259", "0", "--dump", tmp_path / "x.page", "--versions-only"], "--dump needs the page"),
    ]
    for args, msg in cases:
        rc, out, err = cli("page", "get", *args, *p, ok=False)
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1 and msg in lines[0], (args, err)
    assert list(tmp_path.iterdir()) == []
