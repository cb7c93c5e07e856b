"""Per-test database overhead of the pytest plugin against its peers, with a small and a large template.

One test's overhead = a fresh database ready + connect + a read and a small write + teardown, median of --reps:
- neonctl: what the `neon_branch`/`neon_conn` fixtures do (branch of the template at its head, compute
  started - rebuilt from the last test's stopped directory -, psycopg connect, a small UPDATE, a clean stop,
  the previous test's branch deleted);
- pytest-postgresql: its DatabaseJanitor cloning the template on a running server (`pip install
  pytest-postgresql`, or `pip install -e '.[bench]'`);
- `CREATE DATABASE ... TEMPLATE` + connect + `DROP DATABASE` on a running vanilla server.
Templates: --small-mb and --large-mb of table data (goal: <= 0.5 s per test at both sizes for neonctl).

    python benchmarks/bench_fixtures.py [--quick] [--json]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchEnv, bench_parser, log, run_benchmark  # noqa: E402

from neonctl.engine.branches import create_branch, delete_branch, image_at_head  # noqa: E402
from neonctl.engine.compute.endpoint import start_endpoint, stop_endpoint  # noqa: E402
from neonctl.engine.connection import direct_uri  # noqa: E402
from neonctl.engine.timepoint import TimePoint  # noqa: E402

FILL = ("CREATE TABLE items (id int PRIMARY KEY, pad text); "
        "INSERT INTO items SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, {rows}) g; CHECKPOINT")


# Every peer's test reads a row and writes a little, through the primary key: a test's own work, the same
# for each and not proportional to the template's size (a sequential scan here would time the disk instead).
TEST_WRITE = "UPDATE items SET pad = 'x' WHERE id <= 500"


def _rows(mb: int) -> int:
    return max(1, mb * 1024 * 1024 // 1000)


def neonctl_overhead(p, template: str, lsn: int, reps: int, tag: str = "") -> list[float]:
    """What the plugin's fixtures do per test: branch at the template's head, start, connect, query, a clean
    stop, and the previous test's branch deleted (the plugin deletes it once the next compute started)."""
    out, previous = [], None
    for i in range(reps):
        name = f"fx-{template}{tag}-{i}"
        t = time.perf_counter()
        create_branch(p, name, TimePoint(template, lsn), expires_at=time.time() + 3600)
        st = start_endpoint(p, name, suspend_timeout=0)
        with psycopg.connect(direct_uri(p, st.port), autocommit=True) as c:
            c.execute("SELECT count(*) FROM items WHERE id = 1").fetchone()
            c.execute(TEST_WRITE)
        stop_endpoint(p, name)
        if previous:
            delete_branch(p, previous, force=True)
        previous = name
        out.append(time.perf_counter() - t)
    if previous:
        delete_branch(p, previous, force=True)
    return out


def create_database_overhead(port: int, template: str, reps: int) -> list[float]:
    out = []
    admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    for i in range(reps):
        t = time.perf_counter()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE t_{i} TEMPLATE {template}")
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=t_{i}", autocommit=True) as c:
            c.execute("SELECT count(*) FROM items WHERE id = 1").fetchone()
            c.execute(TEST_WRITE)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE t_{i}")
        out.append(time.perf_counter() - t)
    return out


def pytest_postgresql_overhead(port: int, template: str, reps: int, version: int) -> list[float] | None:
    try:
        from pytest_postgresql.janitor import DatabaseJanitor
    except ImportError:
        log("pytest-postgresql is not installed: pip install pytest-postgresql (skipping that peer)")
        return None
    out = []
    for i in range(reps):
        t = time.perf_counter()
        janitor = DatabaseJanitor(user="postgres", host="127.0.0.1", port=port, version=version, dbname=f"pp_{i}",
                                  template_dbname=template)
        janitor.init()
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=pp_{i}", autocommit=True) as c:
            c.execute("SELECT count(*) FROM items WHERE id = 1").fetchone()
            c.execute(TEST_WRITE)
        janitor.drop()
        out.append(time.perf_counter() - t)
    return out


def body(env: BenchEnv) -> None:
    a = env.args
    p = env.project("fixtures")
    p.set_suspend_timeout(0)
    v = env.vanilla("fixtures")
    v.configure(p, fsync=True)
    v.start()
    admin = f"host=127.0.0.1 port={v.port} user=postgres dbname=postgres"
    env.result["sizes"] = {}
    for label, mb in (("small", a.small_mb), ("large", a.large_mb)):
        log(f"{label} template: {mb} MB ...")
        tpl = f"tpl_{label}"
        create_branch(p, tpl, TimePoint("main"))
        st = start_endpoint(p, tpl)
        with psycopg.connect(st.admin_dsn, autocommit=True) as c:
            c.execute(FILL.format(rows=_rows(mb)))
            size = c.execute("SELECT pg_database_size('postgres')").fetchone()[0]
            c.execute("VACUUM ANALYZE")  # as the plugin does for its template
        stop_endpoint(p, tpl)
        lsn = image_at_head(p, tpl)
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {tpl}")
        with psycopg.connect(f"host=127.0.0.1 port={v.port} user=postgres dbname={tpl}", autocommit=True) as c:
            c.execute(FILL.format(rows=_rows(mb)))
        neonctl_overhead(p, tpl, lsn, 1, "-warmup")  # caches, and a stopped directory of a test
        res = {"database_mb": round(size / 2**20),
               "neonctl": neonctl_overhead(p, tpl, lsn, a.reps),
               "create_database_template": create_database_overhead(v.port, tpl, a.reps),
               "pytest_postgresql": pytest_postgresql_overhead(v.port, tpl, a.reps, env.rt.version)}
        env.result["sizes"][label] = {k: ([round(x, 3) for x in val] if isinstance(val, list) else val)
                                      for k, val in res.items()}
        log(f"{label}: " + ", ".join(f"{k} {statistics.median(val):.3f} s" for k, val in res.items()
                                     if isinstance(val, list)))
    v.stop()


def render(res: dict) -> list[str]:
    out = ["", "per-test overhead (fresh database + connect + a read and a small write + teardown), median seconds", "",
           f"{'template':<16} {'neonctl':>9} {'pytest-postgresql':>18} {'CREATE DATABASE':>16}"]
    for label, r in res.get("sizes", {}).items():
        def med(k, r=r):
            return f"{statistics.median(r[k]):.3f}" if r.get(k) else "n/a"
        out.append(f"{label + ' ' + str(r['database_mb']) + ' MB':<16} {med('neonctl'):>9} "
                   f"{med('pytest_postgresql'):>18} {med('create_database_template'):>16}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--reps", type=int, help="tests per configuration (default 7; --quick 3)")
    ap.add_argument("--small-mb", type=int, default=10)
    ap.add_argument("--large-mb", type=int, help="default 500; --quick 50")
    a = ap.parse_args(argv)
    a.reps = a.reps or (3 if a.quick else 7)
    a.large_mb = a.large_mb or (50 if a.quick else 500)
    return run_benchmark(a, "fixtures", body, render)


if __name__ == "__main__":
    sys.exit(main())
