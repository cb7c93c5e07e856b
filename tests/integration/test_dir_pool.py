"""The pool of stopped directories (issue 16): each branch's own clean stop stays reusable while others run
and stop, a start is rebuilt from the kept directory that needs the fewest writes, and the bounds hold."""

from __future__ import annotations

import re

from conftest import connect, image_of_running_branch, materialise_next_start, start_how

from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import directory_pool


def _changed_pages(cli, project, branch: str) -> int:
    _, _, err = cli("endpoint", "start", branch, "-p", project.name)
    m = re.search(r"rebuilt from the stopped compute's directory: (\d+) changed", err)
    assert m, err
    return int(m.group(1))


def test_pool_keeps_each_branch_and_picks_the_fewest_writes(pg18, cli):
    p = ["-p", pg18.name]
    cli("project", "set", "--pool-size", "3", *p)
    try:
        cli("branch", "create", "--name", "pbase", *p)
        cli("endpoint", "start", "pbase", *p)
        with connect(pg18, "pbase") as conn:
            conn.execute("CREATE TABLE pt (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO pt SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
            # hint bits and the visibility map set once, and no autovacuum later: a compute's reads then
            # dirty no page, so each branch's kept directory differs from the image only by its own writes
            conn.execute("ALTER TABLE pt SET (autovacuum_enabled = off)")
            conn.execute("VACUUM (FREEZE, ANALYZE) pt")
        image_of_running_branch(pg18, "pbase")
        cli("endpoint", "stop", "pbase", *p)
        for n in ("pbig", "psmall", "pfresh"):
            cli("branch", "create", "--name", n, "--parent", "pbase", *p)
        materialise_next_start(pg18)  # (pbase's directory ran from before the image: not a rebuild source)
        # both run at once (a start takes the directory it is made from out of the pool), then both stop
        start_how(cli, pg18, "pbig")
        start_how(cli, pg18, "psmall")
        with connect(pg18, "pbig") as conn:
            conn.execute("UPDATE pt SET v = 'big' WHERE id % 3 = 0")  # most pages of the table
        with connect(pg18, "psmall") as conn:
            conn.execute("UPDATE pt SET v = 'small' WHERE id <= 5")
        cli("endpoint", "stop", "pbig", *p)
        cli("endpoint", "stop", "psmall", *p)
        assert dir_pool.usage(directory_pool(pg18))["directories"] == 2
        # pbig's own clean stop is still kept although psmall stopped after it: reused as it is
        assert start_how(cli, pg18, "pbig") == "reused"
        with connect(pg18, "pbig") as conn:
            assert conn.execute("SELECT count(*) FROM pt WHERE v = 'big'").fetchone()[0] == 6666
        cli("endpoint", "stop", "pbig", *p)
        # a fresh sibling is rebuilt from the kept directory that needs the fewest writes: psmall's, not pbig's
        rewritten = _changed_pages(cli, pg18, "pfresh")
        costs = [line for line in (pg18.dir / "pageserver" / "pageserver.log").read_text().splitlines()
                 if f"{pg18.branch('pfresh').timeline_id}: pages to rewrite per kept directory" in line][-1]
        per_slot = [int(x) for x in re.findall(r": (\d+)", costs.split("kept directory", 1)[1])]
        assert len(per_slot) == 2 and rewritten == min(per_slot) < max(per_slot), (rewritten, costs)
        with connect(pg18, "pfresh") as conn:
            assert conn.execute("SELECT count(*) FROM pt WHERE v IN ('big', 'small')").fetchone()[0] == 0
        cli("endpoint", "stop", "pfresh", *p)
        # bounds: one directory at most, then none at all
        cli("project", "set", "--pool-size", "1", *p)
        start_how(cli, pg18, "psmall")
        cli("endpoint", "stop", "psmall", *p)
        assert dir_pool.usage(directory_pool(pg18))["directories"] == 1
        cli("project", "set", "--pool-max-mb", "1", *p)  # smaller than any data directory
        start_how(cli, pg18, "pbig")
        cli("endpoint", "stop", "pbig", *p)
        assert dir_pool.usage(directory_pool(pg18))["directories"] == 0  # pbig's taken, nothing kept
        assert start_how(cli, pg18, "pbig") == "full"
        cli("endpoint", "stop", "pbig", *p)
    finally:
        cli("project", "set", "--pool-size", "2", "--pool-max-mb", "8192", *p)
