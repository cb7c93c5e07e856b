"""`neonctl layers query`: golden results over the recorded snapshot, and the command on a real project."""

import csv
import io
import json
from pathlib import Path

import pytest

from neonctl.engine.explorer.metadata import StorageSnapshot
from neonctl.engine.explorer.query import render
from neonctl.engine.explorer.views import DERIVED, VIEWS, MetadataDB

HERE = Path(__file__).parents[1] / "snapshots"
GOLDEN = HERE / "layers_query"

QUERIES = {
    # which layers hold relation X's pages, at what LSNs and times, how big
    "relation_layers": (
        "SELECT l.kind, l.level, lsn(l.lsn_start) AS lsn_start, lsn(l.lsn_end) AS lsn_end, l.file_size,"
        " (SELECT max(commit_time) FROM commits c WHERE c.branch = 'main' AND c.lsn <= l.lsn_end) AS committed_by"
        " FROM layers l JOIN relations r ON r.branch = 'main' AND r.name = 'orders'"
        "  AND l.key_start < r.key_end AND r.key_start < l.key_end"
        " WHERE l.branch = 'main' ORDER BY l.lsn_start, l.key_start"),
    # what a branch shares with its parent
    "shared_with_parent": (
        "SELECT owner, kind, count(*) AS layers, sum(file_size) AS bytes FROM branch_layers"
        " WHERE branch = 'dev' GROUP BY ALL ORDER BY ALL"),
    # where read amplification is worst
    "worst_read_amp": (
        "SELECT branch, start_rel, read_amplification FROM read_amplification"
        " ORDER BY read_amplification DESC, branch, key_start LIMIT 3"),
    "timelines": "SELECT branch, parent, lsn(branch_point) AS branch_point, lsn(head) AS head FROM timelines"
                 " ORDER BY branch",
    "wal": "SELECT branch, segment, wal_bytes FROM wal ORDER BY branch, segment",
}


@pytest.fixture(scope="module")
def recorded():
    db = MetadataDB(StorageSnapshot.from_json((HERE / "explorer_recorded.json").read_text()))
    yield db
    db.close()


@pytest.mark.parametrize("name", sorted(QUERIES))
@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_golden(recorded, name, fmt, request):
    out = render(*recorded.query(QUERIES[name]), fmt) + "\n"
    path = GOLDEN / f"{name}.{fmt}"
    if request.config.getoption("--snapshot-update", default=False):
        path.write_text(out)
    assert out == path.read_text()


def test_views_have_the_documented_columns(recorded):
    for view, cols in VIEWS.items():
        assert recorded.query(f"SELECT * FROM {view} LIMIT 0")[0] == [c for c, _, _ in cols]
    layer_cols = [c for c, _, _ in VIEWS["layers"] if c != "branch"]
    assert recorded.query("SELECT * FROM branch_layers LIMIT 0")[0] == ["branch", "inherited", "owner", "depth",
                                                                        *layer_cols]
    assert recorded.query("SELECT * FROM read_amplification LIMIT 0")[0] == [
        c for c, _, _ in DERIVED["read_amplification"]]


def test_docs_describe_every_view_and_column():
    doc = (Path(__file__).parents[2] / "docs" / "explorer.md").read_text()
    for view, cols in {**VIEWS, **DERIVED}.items():
        assert f"### `{view}`" in doc, view
        for c, _, _ in cols:
            if c != "...":
                assert f"| `{c}` |" in doc, f"{view}.{c}"


def test_query_on_a_real_project(pg18, cli, tmp_path):
    _, out, _ = cli("layers", "query", "-p", "pg18", "-o", "json",
                    "SELECT name, kind, file_size FROM layers WHERE branch = 'main' ORDER BY name")
    rows = json.loads(out)
    _, listed, _ = cli("layers", "list", "-b", "main", "-p", "pg18", "-o", "json")
    assert [r["name"] for r in rows] == sorted(r["name"] for r in json.loads(listed))
    assert rows and {r["kind"] for r in rows} <= {"image", "delta"}
    sql = tmp_path / "q.sql"
    sql.write_text("SELECT branch, lsn(head) AS head FROM timelines WHERE is_default")
    _, out, _ = cli("layers", "query", "-p", "pg18", "-f", sql, "-o", "csv")
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["branch", "head"] and parsed[1][0] == "main" and "/" in parsed[1][1]
    _, out, _ = cli("layers", "query", "-p", "pg18", "SELECT count(*) AS n FROM daemons WHERE state = 'running'")
    assert out.splitlines()[0].strip() == "n" and int(out.splitlines()[2]) == len(pg18.daemons())


@pytest.mark.parametrize("args", [["SELEC 1"], ["SELECT nope FROM layers"], ["-o", "xml", "SELECT 1"], [],
                                  ["-f", "/nonexistent.sql"]])
def test_bad_input_is_one_line(pg18, cli, args):
    rc, out, err = cli("layers", "query", "-p", "pg18", *args, ok=False)
    assert rc != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
