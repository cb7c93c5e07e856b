"""Pageserver layers: freeze, compaction, crash consistency at each step, corruption detection."""

import json
import os
import time

import pytest
from conftest import connect
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.project import load_project
from neonctl.engine.safekeeper.client import flush_lsn as _sk_flush

SMALL = {"checkpoint_distance": 128 * 1024, "checkpoint_timeout": 3600, "compaction_threshold": 3,
         "compaction_target_size": 512 * 1024}


@pytest.fixture(scope="module")
def lp():
    assert cli_main(["init", "--name", "layers", "-o", "json"]) == 0
    p = load_project("layers")
    (p.dir / "pageserver" / "pageserver.json").write_text(json.dumps(SMALL))
    assert cli_main(["start", "-p", "layers", "-o", "json"]) == 0
    assert cli_main(["endpoint", "start", "main", "-p", "layers", "-o", "json"]) == 0
    yield p
    delete_project(p)


def _tl(p):
    return p.branch("main").timeline_id


def _wait_ingested(p):
    flush = _sk_flush(p, _tl(p))
    wait_until(lambda: (PageserverClient.of(p).timeline(_tl(p))["layer_lsn"] or 0) >= flush - 200, 30,
               "the layer builder to reach the safekeepers' flush LSN")


def _layers(p):
    return PageserverClient(p.pageserver_addr).layers(_tl(p))


def _index(p):
    return json.loads((p.dir / "pageserver" / "timelines" / _tl(p) / "layers" / "index_part.json").read_text())


def _versions(p, key, lsn):
    r = PageserverClient.of(p).page(_tl(p), str(key), lsn=lsn, image=False)
    return [(v["lsn"], v["kind"], v["will_init"], v["length"]) for v in r["versions"]], r["complete"]


def _workload(p, n, table="lt"):
    with connect(p) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id serial PRIMARY KEY, v text)")
        for _ in range(n):
            conn.execute(f"INSERT INTO {table} (v) SELECT md5(g::text) FROM generate_series(1, 500) g")
        return int(conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()[0])


def test_freeze_compact_and_catalog_agree(lp, cli):
    _workload(lp, 20)
    _wait_ingested(lp)
    wait_until(lambda: any(d["level"] == 1 for d in _layers(lp)), 30, "L0s should have been compacted into L1s")
    assert len([d for d in _layers(lp) if d["level"] == 0]) <= SMALL["compaction_threshold"]
    # the DuckDB catalog is exactly the index (the commit point), and so are the files
    # Background freezes and compactions may land between the reads (a new layer file is in place
    # before the index names it, by design): retry until one round of reads agrees.
    for _ in range(50):
        a = {d["name"] for d in _layers(lp)}
        idx = {d["name"] for d in _index(lp)["layers"]}
        files = {
            f.name
            for f in (lp.dir / "pageserver" / "timelines" / _tl(lp) / "layers").iterdir()
            if not f.name.endswith(".tmp")
        }  # a freeze or image in progress right now
        if a == idx == files - {"index_part.json"} and a == {d["name"] for d in _layers(lp)}:
            break
        time.sleep(0.2)
    assert a == idx
    assert files - {"index_part.json"} == idx
    rc, out, _ = cli("layers", "stats", "-p", "layers", "-o", "json")
    stats = json.loads(out)
    assert stats["max_read_amplification"] >= 1 and stats["totals"]


def test_compaction_changes_no_answer(lp):
    with connect(lp) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lt (id serial PRIMARY KEY, v text)")
        db, rel = conn.execute(
            "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()), pg_relation_filenode('lt')"
        ).fetchone()
    lsn = _workload(lp, 4)
    _wait_ingested(lp)
    from neonctl.engine.pageserver.key import rel_block_key

    keys = [rel_block_key(1663, db, rel, 0, b) for b in (0, 3, 7, 20)]
    before = {str(k): _versions(lp, k, lsn) for k in keys}
    assert any(v[0] for v in before.values())
    l0_before = {d["name"] for d in _layers(lp) if d["level"] == 0}
    PageserverClient.of(lp).checkpoint(_tl(lp), compact=True, wait_for_lsn=_sk_flush(lp, _tl(lp)))
    assert not l0_before & {d["name"] for d in _layers(lp)}, "the L0s were compacted away"
    after = {str(k): _versions(lp, k, lsn) for k in keys}
    assert after == before


@pytest.mark.parametrize("point", ["layer-written-before-index", "index-written", "compaction-written-before-index"])
def test_kill9_at_each_layer_step_leaves_consistent_state(lp, cli, point):
    ps = lp.daemon("pageserver")
    ps.stop()
    os.environ["NEONCTL_FAILPOINTS"] = point
    try:
        cli("start", "-p", "layers", ok=False)  # it may already die re-ingesting at start-up
        _workload(lp, 10, table=f"crash_{point.replace('-', '_')}")
        # the failpoint SIGKILLs the pageserver at that step
        wait_until(lambda: ps.pid() is None, 30, f"failpoint {point} to kill the pageserver")
    finally:
        del os.environ["NEONCTL_FAILPOINTS"]
    cli("start", "-p", "layers")
    _wait_ingested(lp)
    layers_dir = lp.dir / "pageserver" / "timelines" / _tl(lp) / "layers"

    def agree():
        # the layer builder keeps running: a new layer file is in place a moment before the index names it
        # (by design), so agreement is awaited; a file the crash left behind would never agree
        index = {d["name"] for d in _index(lp)["layers"]}
        files = {f.name for f in layers_dir.iterdir() if not f.name.endswith(".tmp")} - {"index_part.json"}
        return (files, index) if files == index and {d["name"] for d in _layers(lp)} == index else None

    wait_until(lambda: agree() is not None, 20, "files, index and catalog to agree after restart")
    # and the data is all there: rebuild the compute from storage
    cli("endpoint", "stop", "main", "-p", "layers")
    cli("endpoint", "start", "main", "-p", "layers")
    with connect(lp) as conn:
        n = conn.execute(f"SELECT count(*) FROM crash_{point.replace('-', '_')}").fetchone()[0]
    assert n == 10 * 500


@pytest.mark.parametrize("damage", ["truncate", "flip-summary-bit"])
def test_corrupt_layer_is_detected_with_its_name(lp, damage):
    from neonctl.engine.pageserver.key import Key
    from neonctl.errors import CorruptData

    _workload(lp, 2, table=f"corrupt_{damage.replace('-', '_')}")
    _wait_ingested(lp)
    PageserverClient(lp.pageserver_addr).checkpoint(_tl(lp))
    layer = max((d for d in _layers(lp) if d["kind"] == "delta"), key=lambda d: d["lsn_end"])
    path = lp.dir / "pageserver" / "timelines" / _tl(lp) / "layers" / layer["name"]
    lp.daemon("pageserver").stop()  # readers cache open files: damage it while nobody reads
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 5000]
    else:
        data[100] ^= 0x04
    path.write_bytes(bytes(data))
    from neonctl.engine.storage import start_storage

    start_storage(lp)
    with pytest.raises(CorruptData) as e:
        _versions(lp, Key.parse(layer["key_start"]), layer["lsn_end"])
    assert layer["name"] in str(e.value)
    path.write_bytes(b"")  # leave no broken layer for other tests: drop it from the index
    lp.daemon("pageserver").stop()
    idx = _index(lp)
    idx["layers"] = [d for d in idx["layers"] if d["name"] != layer["name"]]
    idx["disk_consistent_lsn"] = min(idx["disk_consistent_lsn"], layer["lsn_start"])
    (path.parent / "index_part.json").write_text(json.dumps(idx))
    start_storage(lp)
