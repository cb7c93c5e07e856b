"""`branch changes`: relations and page counts changed on a branch, from the layer index alone."""

import json

from conftest import connect


def test_branch_changes_names_relations_and_counts_pages(pg18, cli):
    p = ["-p", pg18.name]
    cli("endpoint", "start", "main", *p)
    try:
        with connect(pg18) as conn:
            conn.execute("DROP TABLE IF EXISTS ch_small, ch_big")
            conn.execute("CREATE TABLE ch_small (x int)")
            conn.execute("CREATE TABLE ch_big (x int)")
            conn.execute("INSERT INTO ch_small SELECT generate_series(1, 1000)")
            conn.execute("INSERT INTO ch_big SELECT generate_series(1, 50000)")
            conn.execute("VACUUM ch_small, ch_big")  # hint bits set here, not as FPIs on the branch
    finally:
        cli("endpoint", "stop", "main", *p)
    cli("branch", "create", "--name", "chg", "--endpoint", *p)
    try:
        with connect(pg18, "chg") as conn:
            conn.execute("UPDATE ch_small SET x = -x WHERE x <= 10")  # a page or two
            conn.execute("INSERT INTO ch_big SELECT generate_series(1, 20000)")  # dozens of pages
        rc, out, _ = cli("branch", "changes", "chg", "-o", "json", *p)
        rows = {(r["relation"], r["fork"]): r["pages_changed"] for r in json.loads(out)["relations"]}
        assert 1 <= rows[("ch_small", "main")] <= 3
        assert rows[("ch_big", "main")] >= 30
        # the parent's own history is not counted as the branch's changes
        assert ("ch_big", "main") in rows and rows[("ch_big", "main")] < 221
    finally:
        cli("endpoint", "stop", "chg", *p)
        cli("branch", "delete", "chg", *p)
