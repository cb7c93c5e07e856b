"""`branch schema-diff A B[@LSN|@TS]`: a unified diff of pg_dump --schema-only of two points; empty when
identical; points without a running endpoint get a temporary read-only one that is stopped afterwards."""

import json

import pytest
from conftest import connect, insert_lsn, new_table, running_main

from neonctl.cli import main
from neonctl.engine.compute.endpoint import list_endpoints
from neonctl.engine.lsn import format_lsn


@pytest.fixture(scope="module")
def sd(pg18):
    """main and sd_dev (both running); sd_dev adds a column after `before` (an LSN on sd_dev)."""
    with running_main(pg18):
        with connect(pg18) as conn:
            new_table(conn, "sd_t", "id int PRIMARY KEY")
        assert main(["branch", "create", "--name", "sd_dev", "--endpoint", "-p", pg18.name, "-o", "json"]) == 0
        with connect(pg18, "sd_dev") as conn:
            conn.execute("INSERT INTO sd_t VALUES (1)")
            before = insert_lsn(conn)
            conn.execute("ALTER TABLE sd_t ADD COLUMN note text")
        yield pg18, before


def test_added_column(sd, cli):
    project, _ = sd
    p = ["-p", project.name]
    rc, out, err = cli("branch", "schema-diff", "main", "sd_dev", *p)
    assert "materialising" not in err, "points with running endpoints use them"
    assert out.startswith("--- main/postgres\n+++ sd_dev/postgres\n@@ ")
    assert "\n-    id integer NOT NULL\n+    id integer NOT NULL,\n+    note text\n" in out
    assert "\x1b[" not in out, "colour only with --color"
    rc, out, _ = cli("branch", "sd", "main", "sd_dev", "--color", "--db", "postgres", *p)
    assert "\x1b[32m+    note text\x1b[0m" in out and "\x1b[31m-    id integer NOT NULL\x1b[0m" in out
    # the default compare point is the base's parent; JSON has every database
    rc, out, _ = cli("branch", "schema-diff", "sd_dev", "-o", "json", *p)
    res = json.loads(out)
    assert res["base"] == "sd_dev" and res["compare"] == "main" and not res["identical"]
    assert "-    note text" in next(d["diff"] for d in res["databases"] if d["database"] == "postgres")
    rc, out, _ = cli("branch", "schema-diff", "main", "sd_dev", "--exit-code", *p, ok=False)
    assert rc == 1 and "+    note text" in out


def test_identical_points_are_empty_and_temporary_endpoints_stop(sd, cli):
    project, before = sd
    p = ["-p", project.name]
    eps = [st.name for st, _ in list_endpoints(project)]
    rc, out, err = cli("branch", "schema-diff", "main", f"sd_dev@{format_lsn(before)}", "--exit-code", *p)
    assert rc == 0 and out == ""
    assert f"sd_dev@{format_lsn(before)}" in err, "a temporary time-travel endpoint was started"
    assert [st.name for st, _ in list_endpoints(project)] == eps, "and stopped again"


def test_schema_diff_bad_input(sd, cli):
    project, _ = sd
    p = ["-p", project.name]
    for args, msg in [(["main", "nope"], "does not exist"), (["main", "sd_dev", "--db", "nope"], "exists neither"),
                      (["main", "^parent"], "root branch"), (["main", "sd_dev@2999-01-01T00:00:00Z"], "in the future")]:
        rc, _, err = cli("branch", "schema-diff", *args, *p, ok=False)
        lines = err.strip().splitlines()
        assert rc != 0 and lines[-1].startswith("error: ") and msg in lines[-1], err
    assert sorted(st.name for st, _ in list_endpoints(project)) == ["main", "sd_dev"]
