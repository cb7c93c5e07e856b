#!/usr/bin/env python3
"""What a pageserver image buys a compute start (`endpoint start` with all WAL since initdb to replay
against a start from a fresh image, and against `pg_ctl start -w` on a vanilla data directory), and what the
starts of issue 16 cost on a small and a large database (second start, sibling, reset, branch at a time,
full restore) against `pg_ctl start -w`.

    python benchmarks/bench_images.py [--pg-bin DIR] [--scale 6] [--reps 3] [--only images,starts]
                                      [--small-scale 1] [--large-scale 70] [--quick] [--json]

Part `images`: one project whose pageserver never creates images on its own (image_creation_threshold set
out of reach), loaded with `pgbench -i -s SCALE` (~100 MB at 6) through an endpoint:

  (a) no image since initdb: `endpoint start` (engine API) median of REPS, stopped in between, the records of
      the kept stopped directories forgotten before each (so none is reused or rebuilt, only its files
      rewritten); every start materialises the initdb image and crash-recovers all WAL since;
  (b) CHECKPOINT on the compute, `POST /v1/timeline/{tl}/image` (timed; size of the image against the
      data directory), then `endpoint start` median of REPS again: replay starts at the image;
  peer: `pg_ctl start -w` on a cleanly shut down vanilla data directory loaded the same way (same
      binaries, the compute's settings minus the synchronous standby, fsync=on), median of REPS.

For every start the WAL it replayed (from the compute's log: `redo starts at` .. `redo done at`).

Part `starts` (issue 16: a start costs what changed, not the database's size): for a small database
(`pgbench -i -s SMALL_SCALE`, ~20 MB at 1) and a large one (LARGE_SCALE, ~1 GB at 70), each in a project of
its own (default pageserver settings, an image at the head after the load) with a vanilla peer loaded the
same way, median of REPS each:

  vanilla         `pg_ctl start -w` of the cleanly stopped vanilla data directory (its stop not timed);
  second start    a branch's endpoint started, stopped cleanly, started again: the second start;
  sibling         two new branches A and B of main; the pool's records forgotten (so only A's directory is
                  known), A started, 100 rows updated on it, A stopped; then B's start;
  reset           a child branch with its endpoint running and 100 rows updated on it, 10 new rows on main
                  (whose endpoint is then stopped, or kept running): the whole `reset_branch` call (branch,
                  stop, swap, restart); the child must then show main's rows;
  branch @ T      main running; light load (pgbench -N -t 100), a marker row, 1.2 s, T = now - 1 s, a second
                  marker: `create_branch` at T + `endpoint start`, then stop; one branch after another; the
                  branch must show the first marker and not the second;
  full restore    main's start with no directory in the pool that can be reused or rebuilt: (kept) the pool's
                  records forgotten, so the files of a kept directory are rewritten in place; (empty) every
                  kept directory removed, so every file is created; the data directory's size on disk when
                  Postgres is launched / the materialise time = MB/s.

Every timed operation begins with the pageserver holding (and having layered) all WAL of the branches
involved, and every endpoint is stopped only once the safekeepers stream from it (a stop right after the start
can lose the compute's last checkpoint records: its kept directory is then ahead of storage, and the next start
restores in full). Each start says how its data directory was made: warm (the stopped directory as it is), rebuilt
(N changed pages rewritten), full. Targets: large <= 2x vanilla and <= 1.3x small for second start, sibling,
reset and branch @ T; a full restore >= 500 MB/s.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
    StartWatch,
    bench_parser,
    create_image,
    db_bytes,
    du_bytes,
    endpoint_start,
    endpoint_stop,
    loadavg,
    log,
    mb,
    median,
    pgbench,
    pool_dirs,
    redo_info,
    run_benchmark,
    sql,
    timeline_of,
    wait_pageserver,
    wait_sync_standby,
)

from neonctl.engine.branch_ops import reset_branch
from neonctl.engine.branches import create_branch
from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import directory_pool, read_state
from neonctl.engine.pageserver.client import PageserverClient  # noqa: E402
from neonctl.engine.timepoint import TimePoint
from neonctl.errors import Conflict


def starts(env: BenchEnv, p, label: str, reps: int, probs: list[str]) -> list[dict]:
    runs = []
    for i in range(reps):
        # no warm start or rebuild from the last stop's directory: its files are only rewritten (as the cases say)
        dir_pool.forget_all(directory_pool(p))
        wait_pageserver(p, "main")  # the pageserver is idle before every timed start
        la = loadavg()[0]
        st = endpoint_start(p, "main")
        st["load1"] = la
        st["pgdata_bytes"] = du_bytes(Path(st["pgdata"]), apparent=True)
        st["pg_wal_bytes"] = du_bytes(Path(st["pgdata"]) / "pg_wal", apparent=True)
        runs.append(st)
        log(f"{label} endpoint start {i + 1}/{reps}: {st['total_s']:.2f}s (materialise {st.get('materialise_s')}s, "
            f"pg_ctl+verify+attach {st.get('pg_ctl_verify_attach_s')}s, redo {st.get('redo_s')}s of "
            f"{mb(st.get('wal_replayed_bytes'))} MB WAL)")
        endpoint_stop(p, "main", probs)
    return runs


def body(env: BenchEnv) -> None:
    parts = env.args.only.split(",") if env.args.only else ["images", "starts"]
    env.result["parts"] = parts
    if "images" in parts:
        images(env)
    if "starts" in parts:
        Starts(env).run()


def images(env: BenchEnv) -> None:
    a = env.args
    rt = env.rt
    probs: list[str] = []
    # the pageserver makes no image on its own: case (a) must replay everything since initdb
    p = env.project("bench-images", pageserver={"image_creation_threshold": 10**9})
    tl = timeline_of(p, "main")
    st = endpoint_start(p, "main")
    log(f"neonctl: pgbench -i -s {a.scale} through the endpoint ...")
    pgbench(rt, st["port"], ["-i", "-q", "-s", str(a.scale)], timeout=3600)
    db = db_bytes(st["port"])
    head = int(sql(st["port"], "SELECT pg_current_wal_insert_lsn() - '0/0'")[0][0])
    endpoint_stop(p, "main", probs)
    initdb_lsn = PageserverClient(p.pageserver_addr).timeline(tl)["initdb_lsn"]
    log(f"  database {mb(db)} MB, {mb(head - initdb_lsn)} MB WAL since initdb; pageserver caught up after "
        f"{wait_pageserver(p, 'main'):.1f}s")

    no_image = starts(env, p, "(a) no image", a.reps, probs)

    st = endpoint_start(p, "main")
    sql(st["port"], "CHECKPOINT")
    wait_pageserver(p, "main")
    log("POST /v1/timeline/{tl}/image ...")
    la = loadavg()[0]
    img, img_s = create_image(p, "main")
    pgdata_nowal = du_bytes(Path(st["pgdata"]), apparent=True) - du_bytes(Path(st["pgdata"]) / "pg_wal", apparent=True)
    endpoint_stop(p, "main", probs)
    image_files = du_bytes(*(p.dir / "pageserver" / "timelines" / tl / "layers" / n for n in img["layers"]))
    log(f"  image at {img['lsn']:X} in {img_s:.1f}s: {len(img['layers'])} layer file(s), {mb(img['file_size'])} MB "
        f"(data dir without pg_wal {mb(pgdata_nowal)} MB)")
    with_image = starts(env, p, "(b) fresh image", a.reps, probs)
    if probs:
        env.problems["bench-images compute postgres.log"] = probs[:8]

    van = env.vanilla("images")
    van.configure(p, fsync=True)
    van.start()
    log(f"vanilla: pgbench -i -s {a.scale} ...")
    pgbench(rt, van.port, ["-i", "-q", "-s", str(a.scale)], timeout=3600)
    vdb = db_bytes(van.port)
    van.stop()
    vpgdata = du_bytes(van.pgdata, apparent=True)
    vwal = du_bytes(van.pgdata / "pg_wal", apparent=True)
    vruns = []
    for i in range(a.reps):
        la_v = loadavg()[0]
        s = van.start()
        r = {"total_s": round(s, 3), "load1": la_v}
        r.update(redo_info(van.logfile.read_text(errors="replace").split("starting PostgreSQL")[-1]))
        vruns.append(r)
        log(f"vanilla pg_ctl start -w {i + 1}/{a.reps}: {s:.3f}s")
        van.stop()

    a_med = median([r["total_s"] for r in no_image])
    b_med = median([r["total_s"] for r in with_image])
    v_med = median([r["total_s"] for r in vruns])
    env.result["images"] = {
        "scale": a.scale,
        "reps": a.reps,
        "db_bytes": db,
        "vanilla_db_bytes": vdb,
        "wal_since_initdb_bytes": head - initdb_lsn,
        "no_image": {"median_s": a_med, "runs": no_image},
        "image": {
            "create_s": round(img_s, 2),
            "load1": la,
            "lsn": img["lsn"],
            "redo_lsn": img["redo_lsn"],
            "layers": len(img["layers"]),
            "file_size": img["file_size"],
            "du_bytes": image_files,
            "pgdata_without_wal_bytes": pgdata_nowal,
        },
        "with_image": {"median_s": b_med, "runs": with_image},
        "vanilla": {"median_s": v_med, "runs": vruns, "pgdata_bytes": vpgdata, "pg_wal_bytes": vwal},
        "ratios": {
            "no_image/with_image": round(a_med / b_med, 2),
            "no_image/vanilla": round(a_med / v_med, 1),
            "with_image/vanilla": round(b_med / v_med, 1),
            "image_size/pgdata_without_wal": round(img["file_size"] / max(pgdata_nowal, 1), 2),
        },
    }


# -- part `starts`: what an endpoint start costs, small database against large (issue 16) -------------------

STARTS_OPS = (  # key, label; the ones in TARGETED are held to <= VS_VANILLA x vanilla and <= VS_SMALL x small
    ("vanilla", "vanilla pg_ctl start -w"),
    ("second_start", "second start of a branch"),
    ("sibling", "start sibling B after A stopped"),
    ("reset_parent_stopped", "branch reset, parent stopped"),
    ("reset_parent_running", "branch reset, parent running"),
    ("branch_at_t", "branch @ 1 s ago + start"),
    ("full_kept", "full restore into kept files"),
    ("full_empty", "full restore into an empty dir"),
)
TARGETED = ("second_start", "sibling", "reset_parent_stopped", "reset_parent_running", "branch_at_t")
VS_VANILLA, VS_SMALL, FULL_MB_S = 2.0, 1.3, 500.0
UPDATE_100 = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN %s AND %s"
RUN_KEYS = ("total_s", "made", "changed_pages", "rebuild_wal_bytes", "pool_dirs_before", "elect_s", "materialise_s",
            "pg_ctl_verify_attach_s", "redo_s", "wal_replayed_bytes")


def made_summary(runs: list[dict]) -> str:
    """How the runs' data directories were made: `warm`, `rebuilt 812p` (changed pages, median run), `full`;
    per run when they differ."""
    def one(r: dict) -> str:
        return f"rebuilt {r.get('changed_pages')}p" if r.get("made") == "rebuilt" else str(r.get("made"))

    kinds = {r.get("made") for r in runs}
    if len(kinds) == 1 and "rebuilt" in kinds:
        return f"rebuilt {sorted(r['changed_pages'] for r in runs)[len(runs) // 2]}p"
    return one(runs[0]) if len(kinds) == 1 else " / ".join(one(r) for r in runs)


class Starts:
    def __init__(self, env: BenchEnv):
        self.env = env
        self.a = env.args
        self.probs: list[str] = []

    def run(self) -> None:
        out = {"reps": self.a.reps}
        for which, scale in (("small", self.a.small_scale), ("large", self.a.large_scale)):
            out[which] = self.size(which, scale)
        sm, lg = out["small"]["ops"], out["large"]["ops"]
        van = lg["vanilla"]["median_s"]
        out["ratios"] = {
            k: {"large/vanilla": round(lg[k]["median_s"] / van, 2),
                "large/small": round(lg[k]["median_s"] / sm[k]["median_s"], 2),
                "small/vanilla_small": round(sm[k]["median_s"] / sm["vanilla"]["median_s"], 2)}
            for k, _ in STARTS_OPS if k != "vanilla"}
        out["targets"] = {
            f"large/vanilla <= {VS_VANILLA:g}": {k: out["ratios"][k]["large/vanilla"] <= VS_VANILLA for k in TARGETED},
            f"large/small <= {VS_SMALL:g}": {k: out["ratios"][k]["large/small"] <= VS_SMALL for k in TARGETED},
            f"full restore MB/s >= {FULL_MB_S:g}": {k: lg[k]["mb_s"] >= FULL_MB_S for k in ("full_kept", "full_empty")},
        }
        self.env.result["starts"] = out
        if self.probs:
            self.env.problems["starts compute postgres.log"] = self.probs[:8]

    # ---- one database size

    def size(self, which: str, scale: int) -> dict:
        env = self.env
        p = env.project(f"starts-{which}")
        st = endpoint_start(p, "main")
        sql(st["port"], "CREATE TABLE marks (tag text, at timestamptz DEFAULT clock_timestamp())")
        log(f"starts {which}: pgbench -i -s {scale} through the endpoint ...")
        t = time.perf_counter()
        pgbench(env.rt, st["port"], ["-i", "-q", "-s", str(scale)], timeout=7200)
        load_s = time.perf_counter() - t
        db = db_bytes(st["port"])
        sql(st["port"], "CHECKPOINT")
        self.stop(p, "main")
        wait_pageserver(p, "main", timeout=3600)
        try:
            info, img_s = create_image(p, "main")
            image = f"{mb(info['file_size'])} MB in {img_s:.1f}s"
        except Conflict as e:  # the pageserver made one on its own at this point already
            image = f"not made ({e.message[:60]})"
        log(f"  {mb(db)} MB loaded in {load_s:.0f}s; image {image}")
        out = {"scale": scale, "db_bytes": db, "load_s": round(load_s, 1), "image": image}
        ops = {"vanilla": self.vanilla(p, which, scale, out)}
        ops["second_start"] = self.second_start(p)
        ops["sibling"] = self.sibling(p)
        child = "rs"
        create_branch(p, child, TimePoint("main"))
        endpoint_start(p, child)
        ops["reset_parent_stopped"] = self.reset(p, child, parent_running=False)
        main_port = endpoint_start(p, "main")["port"]
        ops["reset_parent_running"] = self.reset(p, child, parent_running=True, main_port=main_port)
        self.stop(p, child)
        ops["branch_at_t"] = self.branch_at_t(p, main_port)
        self.stop(p, "main")
        ops["full_kept"] = self.full(p, empty=False)
        ops["full_empty"] = self.full(p, empty=True)
        for k, op in ops.items():
            op["median_s"] = median([r["total_s"] for r in op["runs"]])
            op["made"] = made_summary(op["runs"]) if k != "vanilla" else "clean shutdown"
        for k in ("full_kept", "full_empty"):
            runs = ops[k]["runs"]
            ops[k]["mb_s"] = round(statistics.median(r["mb_s"] for r in runs), 1)
            ops[k]["mb_s_without_wal"] = round(statistics.median(r["mb_s_without_wal"] for r in runs), 1)
            ops[k]["pgdata_bytes"] = int(statistics.median(r["pgdata_bytes"] for r in runs))
        out["ops"] = ops
        return out

    @staticmethod
    def timed(label: str, fn, *args) -> dict:
        """`fn(*args)` -> the run's dict (with total_s), with the load before it; logged."""
        la = loadavg()[0]
        r = fn(*args)
        r["load1"] = la
        log(f"  {label}: {r['total_s']:.3f}s" + (f", {r['made']}" if r.get("made") else "")
            + (f" ({r['changed_pages']} changed pages)" if r.get("made") == "rebuilt" else "")
            + (f", materialise {r['materialise_s']}s" if r.get("materialise_s") is not None else ""))
        return r

    def vanilla(self, p, which: str, scale: int, out: dict) -> dict:
        van = self.env.vanilla(f"starts-{which}")
        van.configure(p, fsync=True)
        van.start()
        log(f"vanilla {which}: pgbench -i -s {scale} ...")
        pgbench(self.env.rt, van.port, ["-i", "-q", "-s", str(scale)], timeout=7200)
        out["vanilla_db_bytes"] = db_bytes(van.port)
        van.stop()
        out["vanilla_pgdata_bytes"] = du_bytes(van.pgdata, apparent=True)

        def one() -> dict:
            r = {"total_s": round(van.start(), 3)}
            r.update(redo_info(van.logfile.read_text(errors="replace").split("starting PostgreSQL")[-1]))
            return r

        runs = []
        for i in range(self.a.reps):
            runs.append(self.timed(f"{which} vanilla pg_ctl start -w {i + 1}/{self.a.reps}", one))
            van.stop()
        return {"runs": runs}

    def stop(self, p, branch: str) -> None:
        """`endpoint stop`, once the safekeepers stream from the endpoint as synchronous standbys: stopped before
        that, the compute's last records (its checkpoints) may never reach them, and its kept directory is then
        ahead of storage - neither reusable nor rebuildable."""
        wait_sync_standby(p, read_state(p, branch).port)
        endpoint_stop(p, branch, self.probs)

    @staticmethod
    def start(p, branch: str, at_pg_start=None) -> dict:
        """A timed endpoint start; the fields of it a run keeps."""
        st = endpoint_start(p, branch, at_pg_start=at_pg_start)
        return {k: st[k] for k in RUN_KEYS if k in st}

    def second_start(self, p) -> dict:
        b = "second"
        create_branch(p, b, TimePoint("main"))
        runs = []
        for i in range(self.a.reps):
            first = endpoint_start(p, b)
            log(f"  (first start {i + 1}/{self.a.reps}, not timed: {first['total_s']:.3f}s, {first.get('made')})")
            self.stop(p, b)
            wait_pageserver(p, "main")
            wait_pageserver(p, b)
            runs.append(self.timed(f"second start {i + 1}/{self.a.reps}", self.start, p, b))
            self.stop(p, b)
        return {"runs": runs}

    def sibling(self, p) -> dict:
        runs = []
        for i in range(self.a.reps):
            a_, b_ = f"sib-a{i}", f"sib-b{i}"
            create_branch(p, a_, TimePoint("main"))
            create_branch(p, b_, TimePoint("main"))
            dir_pool.forget_all(directory_pool(p))  # the directory B's start may build from is A's alone
            st = endpoint_start(p, a_)
            sql(st["port"], UPDATE_100, (i * 100 + 1, i * 100 + 100))
            self.stop(p, a_)
            wait_pageserver(p, "main")
            wait_pageserver(p, a_)
            runs.append(self.timed(f"sibling start {i + 1}/{self.a.reps}", self.start, p, b_))
            self.stop(p, b_)
        return {"runs": runs}

    def reset(self, p, child: str, parent_running: bool, main_port: int | None = None) -> dict:
        runs = []
        what = "running" if parent_running else "stopped"
        for i in range(self.a.reps):
            cport = read_state(p, child).port
            sql(cport, UPDATE_100, (i * 100 + 1, i * 100 + 100))  # the test's own changes, undone by the reset
            port = main_port if parent_running else endpoint_start(p, "main")["port"]
            sql(port, "INSERT INTO marks (tag) SELECT 'reset' FROM generate_series(1, 10)")
            want = sql(port, "SELECT count(*) FROM marks")[0][0]
            if not parent_running:
                self.stop(p, "main")
            wait_sync_standby(p, cport)  # as in stop(): the reset stops it
            wait_pageserver(p, "main")
            wait_pageserver(p, child)

            r = self.timed(f"reset (parent {what}) {i + 1}/{self.a.reps}", self.reset_once, p, child, cport)
            got = sql(read_state(p, child).port, "SELECT count(*) FROM marks")[0][0]
            r["correct"] = got == want
            if got != want:
                raise RuntimeError(f"after branch reset {child} shows {got} marker rows, its parent {want}")
            runs.append(r)
        return {"runs": runs}

    @staticmethod
    def reset_once(p, child: str, port: int) -> dict:
        """`reset_branch` timed, with the restart's part of it and how the restarted directory was made."""
        pool: list[int] = []  # the pool's directories when the restart begins (after the stop kept one)
        watch = StartWatch({"restarting the endpoint": lambda: pool.append(pool_dirs(p))})
        t0 = time.perf_counter()
        res = reset_branch(p, child, progress=watch)
        t1 = time.perf_counter() - watch.paused
        restart = watch.first("restarting the endpoint")
        r = {"total_s": round(t1 - t0, 3), "pool_dirs_before": pool[0] if pool else None,
             **watch.made(pool[0] if pool else 0), "restart_s": round(t1 - restart, 3) if restart else None,
             "same_port": res.endpoint is not None and res.endpoint.port == port}
        if "materialise" in watch.marks and "pg_ctl" in watch.marks:
            r["materialise_s"] = round(watch.marks["pg_ctl"] - watch.marks["materialise"], 3)
        return r

    @staticmethod
    def branch_and_start(p, name: str, ts: datetime) -> dict:
        """`create_branch` at `ts` + `endpoint start` on it, timed together."""
        t0 = time.perf_counter()
        create_branch(p, name, TimePoint("main", None, ts))
        create_s = time.perf_counter() - t0
        st = endpoint_start(p, name)
        return {**{k: st[k] for k in RUN_KEYS if k in st}, "total_s": round(create_s + st["total_s"], 3),
                "create_s": round(create_s, 3), "start_s": st["total_s"], "port": st["port"]}

    def branch_at_t(self, p, main_port: int) -> dict:
        runs = []
        prev = None
        for i in range(self.a.reps):
            pgbench(self.env.rt, main_port, ["-n", "-N", "-c", "1", "-t", "100"], timeout=600)  # light load
            sql(main_port, "INSERT INTO marks (tag) VALUES (%s)", (f"at{i}",))
            time.sleep(1.2)
            ts = datetime.now(UTC) - timedelta(seconds=1)
            sql(main_port, "INSERT INTO marks (tag) VALUES (%s)", (f"after{i}",))
            wait_pageserver(p, "main")
            if prev:
                wait_pageserver(p, prev)
            name = f"at-{i}"
            r = self.timed(f"branch @ 1 s ago + start {i + 1}/{self.a.reps}", self.branch_and_start, p, name, ts)
            tags = {t for (t,) in sql(r.pop("port"), "SELECT tag FROM marks WHERE tag IN (%s, %s)",
                                      (f"at{i}", f"after{i}"))}
            r["correct"] = tags == {f"at{i}"}
            if not r["correct"]:
                raise RuntimeError(f"branch at T = now - 1 s shows markers {sorted(tags)}; want only at{i}")
            runs.append(r)
            self.stop(p, name)
            prev = name
        return {"runs": runs}

    def full(self, p, empty: bool) -> dict:
        runs = []
        pool = directory_pool(p)
        pgdata = p.compute_root() / "endpoints" / "main" / "pgdata"
        for i in range(self.a.reps):
            if empty:  # no directory at all: every file is created
                with dir_pool.locked(pool):
                    for slot in dir_pool.slots(pool):
                        dir_pool.remove_slot(slot)
            else:  # directories without records: only their files are of use, rewritten in full
                dir_pool.forget_all(pool)
            wait_pageserver(p, "main")
            size: dict = {}

            def probe(size: dict = size) -> None:  # the materialised directory, as Postgres is about to run on it
                size["pgdata_bytes"] = du_bytes(pgdata, apparent=True)
                size["pg_wal_bytes"] = du_bytes(pgdata / "pg_wal", apparent=True)

            r = self.timed(f"full restore ({'empty dir' if empty else 'kept files'}) {i + 1}/{self.a.reps}",
                           self.start, p, "main", probe)
            r.update(size)
            m = r.get("materialise_s") or float("nan")
            r["mb_s"] = round(size["pgdata_bytes"] / 2**20 / m, 1)
            r["mb_s_without_wal"] = round((size["pgdata_bytes"] - size["pg_wal_bytes"]) / 2**20 / m, 1)
            log(f"    {mb(size['pgdata_bytes'])} MB ({mb(size['pg_wal_bytes'])} MB pg_wal) in {m}s: {r['mb_s']} MB/s")
            runs.append(r)
            self.stop(p, "main")
        return {"runs": runs}


def render_starts(r: dict) -> list[str]:
    sm, lg = r["small"], r["large"]
    out = ["", (f"issue 16, endpoint start cost: small -s {sm['scale']} ({mb(sm['db_bytes'])} MB) against large "
                f"-s {lg['scale']} ({mb(lg['db_bytes'])} MB; vanilla data dir {mb(lg['vanilla_pgdata_bytes'])} MB); "
                f"median of {r['reps']}; made: warm / rebuilt Np (changed pages) / full")]
    w = 34
    out.append(f"{'operation':<{w}}{'small':>8}  {'made':<18}{'large':>8}  {'made':<18}"
               f"{'large/vanilla':>14}{'large/small':>13}  large runs")
    for k, label in STARTS_OPS:
        s, g = sm["ops"][k], lg["ops"][k]
        ra = r["ratios"].get(k)
        cells = f"{label:<{w}}{s['median_s']:>7.3f}s  {s['made'][:18]:<18}{g['median_s']:>7.3f}s  {g['made'][:18]:<18}"
        if ra is None:
            cells += f"{1:>11.2f}x{'':<3}{'':>13}"
        else:
            okv = ("" if k not in TARGETED else " ok" if ra["large/vanilla"] <= VS_VANILLA else " NO")
            oks = ("" if k not in TARGETED else " ok" if ra["large/small"] <= VS_SMALL else " NO")
            cells += f"{ra['large/vanilla']:>11.2f}x{okv:<3}{ra['large/small']:>9.2f}x{oks:<3}"
        out.append(cells + "  " + " ".join(f"{x['total_s']:.2f}" for x in g["runs"]))
    out.append(f"targets for {', '.join(TARGETED)}: large <= {VS_VANILLA:g}x vanilla pg_ctl start, <= {VS_SMALL:g}x "
               f"small; ok = met, NO = missed")
    for k in ("full_kept", "full_empty"):
        s, g = sm["ops"][k], lg["ops"][k]
        ok = "met" if g["mb_s"] >= FULL_MB_S else "MISSED"
        out.append(f"{dict(STARTS_OPS)[k]}: large {mb(g['pgdata_bytes'])} MB at {g['mb_s']:.0f} MB/s "
                   f"({g['mb_s_without_wal']:.0f} MB/s without pg_wal), small {mb(s['pgdata_bytes'])} MB at "
                   f"{s['mb_s']:.0f} MB/s; target >= {FULL_MB_S:g} MB/s (large): {ok}")
    for k in ("reset_parent_stopped", "reset_parent_running"):
        g = lg["ops"][k]
        med = sorted(g["runs"], key=lambda x: x["total_s"])[len(g["runs"]) // 2]
        out.append(f"{dict(STARTS_OPS)[k]} (large, median run): restart {med.get('restart_s')}s of "
                   f"{med['total_s']}s, materialise {med.get('materialise_s')}s")
    g = lg["ops"]["branch_at_t"]
    med = sorted(g["runs"], key=lambda x: x["total_s"])[len(g["runs"]) // 2]
    out.append(f"branch @ 1 s ago + start (large, median run): create_branch {med['create_s']}s + endpoint start "
               f"{med['start_s']}s (materialise {med.get('materialise_s')}s)")
    out.append("loads: " + "; ".join(f"{w_} -s {x['scale']}: {mb(x['db_bytes'])} MB in {x['load_s']:.0f}s, image "
                                     f"{x['image']}" for w_, x in (("small", sm), ("large", lg))))
    return out


def render(res: dict) -> list[str]:
    out = []
    r = res.get("images")
    if r:
        im, n, w, v = r["image"], r["no_image"], r["with_image"], r["vanilla"]
        out.append("")
        out.append(
            f"compute start, pgbench -i -s {r['scale']} database ({mb(r['db_bytes'])} MB; vanilla "
            f"{mb(r['vanilla_db_bytes'])} MB), WAL since initdb {mb(r['wal_since_initdb_bytes'])} MB; "
            f"median of {r['reps']}"
        )
        out.append(
            f"{'':<36}{'median':>8}{'min':>8}  {'runs':<22}{'WAL replayed':>13}{'redo':>8}{'materialise':>12}"
            f"{'data dir':>10}{'load1':>7}"
        )

        def row(label: str, d: dict) -> str:
            med = sorted(d["runs"], key=lambda x: x["total_s"])[len(d["runs"]) // 2]
            runs = " ".join(f"{x['total_s']:.2f}" for x in d["runs"])
            wal = med.get("wal_replayed_bytes")
            walmb = f"{wal / 2**20:.2f}" if wal is not None else "?"
            best = min(x["total_s"] for x in d["runs"])
            return (
                f"{label:<36}{d['median_s']:>7.2f}s{best:>7.2f}s  {runs:<22}{walmb:>10} MB"
                f"{med.get('redo_s', 0):>7.2f}s{(med.get('materialise_s') or 0):>11.2f}s"
                f"{mb(med.get('pgdata_bytes')) or '':>7} MB{med['load1']:>7.2f}"
            )

        out.append(row("(a) endpoint start, no image", n))
        out.append(row("(b) endpoint start, fresh image", w))
        vr = dict(v)
        vr["runs"] = [dict(x, pgdata_bytes=v["pgdata_bytes"]) for x in v["runs"]]
        out.append(row("vanilla pg_ctl start -w (clean)", vr))
        out.append("")
        out.append(
            f"image: created in {im['create_s']:.1f}s (load1 {im['load1']}), {im['layers']} layer file(s), "
            f"{mb(im['file_size'])} MB ({mb(im['du_bytes'])} MB on disk) vs data dir without pg_wal "
            f"{mb(im['pgdata_without_wal_bytes'])} MB: x{r['ratios']['image_size/pgdata_without_wal']}; "
            f"vanilla data dir {mb(v['pgdata_bytes'])} MB ({mb(v['pg_wal_bytes'])} MB pg_wal)"
        )
        ra = r["ratios"]
        out.append(
            f"ratios: (a)/(b) {ra['no_image/with_image']}x, (a)/vanilla {ra['no_image/vanilla']}x, "
            f"(b)/vanilla {ra['with_image/vanilla']}x"
        )
        m = sorted(w["runs"], key=lambda x: x["total_s"])[len(w["runs"]) // 2]
        out.append(
            f"(b) median run: elect {m.get('elect_s')}s, materialise {m.get('materialise_s')}s, pg_ctl start + "
            f"verify + attach {m.get('pg_ctl_verify_attach_s')}s (end-of-recovery checkpoint "
            f"{m.get('end_of_recovery_checkpoint_s')}s)"
        )
    if res.get("starts"):
        out.extend(render_starts(res["starts"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--scale", type=int, help="pgbench scale (default 6, ~100 MB; --quick 1)")
    ap.add_argument("--reps", type=int, help="timed starts per case (default 3; --quick 1)")
    ap.add_argument("--small-scale", type=int, default=1, help="part starts: the small database (default 1, ~20 MB)")
    ap.add_argument("--large-scale", type=int, help="part starts: the large database (default 70, ~1 GB; --quick 3)")
    ap.add_argument("--only", help="comma-separated parts to run: images,starts (default both)")
    a = ap.parse_args(argv)
    a.scale = a.scale or (1 if a.quick else 6)
    a.reps = a.reps or (1 if a.quick else 3)
    a.large_scale = a.large_scale or (3 if a.quick else 70)
    if a.only and set(a.only.split(",")) - {"images", "starts"}:
        ap.error(f"--only: unknown part(s) in {a.only!r}; the parts are images,starts")
    return run_benchmark(a, "bench-images", body, render)


if __name__ == "__main__":
    sys.exit(main())
