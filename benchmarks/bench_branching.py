#!/usr/bin/env python3
"""Copy-on-write branches against copies: branch creation time, storage per branch, and point-in-time
restore, each against vanilla PostgreSQL (same binaries) doing the same with templates and WAL archives.

    python benchmarks/bench_branching.py [--pg-bin DIR] [--small-scale 1] [--large-scale 70] [--reps 5]
                                         [--branches 20] [--storage-parent small|large]
                                         [--pitr-parent small|large] [--pitr-txns 2000] [--only a,b,c]
                                         [--quick] [--json]

Two projects, `small` and `large`, each with `main` loaded by `pgbench -i -s SCALE` through an endpoint
(~20 MB at scale 1, ~1 GB at 70), then CHECKPOINT, endpoint stop and an image (`POST .../image`; the
pageserver may have made one on its own already), so every part starts from idle storage. The vanilla
peer loads the same scales into databases `src_small` / `src_large` of one server.

(a) branch creation, median of REPS each: `neonctl branch create --parent main` (the CLI process) and
    `create_branch` (engine API) against `CREATE DATABASE ... TEMPLATE src_X` (statement time, default
    strategy WAL_LOG and STRATEGY FILE_COPY; each copy dropped after it was timed).
(b) storage: BRANCHES branches of one parent, each started, `UPDATE` of 100 rows, stopped: growth of the
    pageserver + safekeeper directories (`du`, after freezing the open layers) against BRANCHES
    `CREATE DATABASE ... TEMPLATE` copies with the same UPDATE each (growth of the data directory, CHECKPOINT
    before each measurement).
(c) point-in-time restore of `main` of one parent: a marker row, time T, a marker row, with pgbench
    `-t TXNS` TPC-B on both sides of T; then `neonctl branch restore main ^self@T` (CLI, endpoint running:
    until the restarted endpoint accepts connections), and `create_branch` at T + `endpoint start` on it;
    against vanilla: `pg_basebackup` before the workload, WAL archived by `archive_command` to a local
    directory, then copy the base backup, `recovery_target_time = T`, `recovery_target_action = promote`,
    `hot_standby = off`, `pg_ctl start -w` and wait until it is out of recovery. Both must show the first
    marker and not the second.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from _common import (
    BenchEnv,
    Vanilla,
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
    redo_info,
    run_benchmark,
    run_cli,
    sql,
    timed_sql,
    timeline_of,
    wait_pageserver,
)

from neonctl.engine.branches import create_branch
from neonctl.engine.compute.endpoint import read_state
from neonctl.engine.pageserver.client import PageserverClient  # noqa: E402
from neonctl.engine.timepoint import TimePoint
from neonctl.errors import Conflict

LOAD_LIMIT_S = 180  # the brief: the biggest scale that loads within 3 minutes on this machine
PITR_SPEEDUP = 5.0  # issue 16: restore ^self@T and branch at T + start vs pg_basebackup + recovery_target_time


def restore_phases(progress: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Split a `branch restore` by its progress lines: CLI start-up + checks, branching, stopping the old
    compute, and the new compute's start (elect, materialise, pg_ctl start + verify + attach)."""
    firsts: dict[str, float] = {}
    for t, line in progress:
        for key, prefix in (("branching", "branching "), ("stopping", "stopping the endpoint"),
                            ("restarting", "restarting the endpoint"), ("materialise", "materialising "),
                            ("pg_ctl", "starting PostgreSQL")):
            if line.startswith(prefix):
                firsts.setdefault(key, t)
    out = {}
    order = ["branching", "stopping", "restarting", "materialise", "pg_ctl"]
    seen = [k for k in order if k in firsts]
    out["before_branching_s"] = round(firsts.get(seen[0], total), 3) if seen else round(total, 3)
    for k, nxt in zip(seen, [*seen[1:], None], strict=False):
        out[f"{k}_s"] = round((firsts[nxt] if nxt else total) - firsts[k], 3)
    return out


class Branching:
    def __init__(self, env: BenchEnv):
        self.env = env
        self.a = env.args
        self.rt = env.rt
        self.probs: list[str] = []
        self.projects: dict[str, object] = {}
        self.van: Vanilla | None = None
        self.res = env.result
        self.res["loads"] = {}

    # ---- set-up

    def scale(self, which: str) -> int:
        return self.a.small_scale if which == "small" else self.a.large_scale

    def load_project(self, which: str):
        if which in self.projects:
            return self.projects[which]
        p = self.env.project(which)
        st = endpoint_start(p, "main")
        log(f"neonctl {which}: pgbench -i -s {self.scale(which)} through the endpoint ...")
        la = loadavg()[0]
        t = time.perf_counter()
        pgbench(self.rt, st["port"], ["-i", "-q", "-s", str(self.scale(which))], timeout=7200)
        load_s = time.perf_counter() - t
        db = db_bytes(st["port"])
        sql(st["port"], "CHECKPOINT")
        endpoint_stop(p, "main", self.probs)
        t = time.perf_counter()
        wait_pageserver(p, "main", timeout=3600)
        ingest_s = time.perf_counter() - t
        img_s, img = self.image(p)
        self.res["loads"][f"neonctl {which}"] = {
            "scale": self.scale(which), "db_bytes": db, "load_s": round(load_s, 1), "load1": la,
            "pageserver_catch_up_s": round(ingest_s, 1), "image_s": round(img_s, 1), "image": img,
            "over_limit": load_s > LOAD_LIMIT_S}
        log(f"  {mb(db)} MB loaded in {load_s:.0f}s; pageserver caught up {ingest_s:.0f}s later; "
            f"image {img} in {img_s:.0f}s")
        self.projects[which] = p
        return p

    def image(self, p) -> tuple[float, str]:
        """An image at the head (the pageserver may have made one on its own: then nothing is gained)."""
        t = time.perf_counter()
        try:
            info, _ = create_image(p, "main")
            what = f"{mb(info['file_size'])} MB"
        except Conflict as e:
            what = f"not made ({e.message[:60]})"
        wait_pageserver(p, "main")
        return time.perf_counter() - t, what

    def vanilla(self) -> Vanilla:
        if self.van is None:
            p = next(iter(self.projects.values()))
            self.van = self.env.vanilla("branching")
            self.van.configure(p, fsync=True)
            self.van.start()
        return self.van

    def vanilla_src(self, which: str) -> str:
        v = self.vanilla()
        db = f"src_{which}"
        if not sql(v.port, "SELECT 1 FROM pg_database WHERE datname = %s", (db,)):
            sql(v.port, f"CREATE DATABASE {db}")
            log(f"vanilla: pgbench -i -s {self.scale(which)} into {db} ...")
            t = time.perf_counter()
            pgbench(self.rt, v.port, ["-i", "-q", "-s", str(self.scale(which))], timeout=7200, db=db)
            self.res["loads"][f"vanilla {which}"] = {"scale": self.scale(which), "db_bytes": db_bytes(v.port, db),
                                                     "load_s": round(time.perf_counter() - t, 1)}
            sql(v.port, "CHECKPOINT")
        return db

    # ---- (a) branch creation

    def creation(self) -> None:
        out = {}
        for which in ("small", "large"):
            p = self.load_project(which)
            src = self.vanilla_src(which)
            v = self.vanilla()
            cli, api, wal_log, file_copy, noop = [], [], [], [], []
            for i in range(self.a.reps):
                noop.append(round(run_cli(["--version"])[1], 3))  # the CLI's Python start-up alone
                wait_pageserver(p, "main")
                args = ["branch", "create", "--name", f"cli{i}", "--parent", "main", "-p", p.name, "-o", "json"]
                _, s, _ = run_cli(args)
                cli.append(round(s, 3))
                wait_pageserver(p, "main")
                t = time.perf_counter()
                create_branch(p, f"api{i}", TimePoint("main"))
                api.append(round(time.perf_counter() - t, 3))
                for strategy, runs in (("", wal_log), (" STRATEGY FILE_COPY", file_copy)):
                    runs.append(round(timed_sql(v.port, f"CREATE DATABASE copy_{i} TEMPLATE {src}{strategy}"), 3))
                    sql(v.port, f"DROP DATABASE copy_{i}")
                log(
                    f"(a) {which} {i + 1}/{self.a.reps}: neonctl CLI {cli[-1]:.2f}s, API {api[-1]:.3f}s; vanilla "
                    f"CREATE DATABASE TEMPLATE {wal_log[-1]:.2f}s (WAL_LOG), {file_copy[-1]:.2f}s (FILE_COPY)"
                )
            out[which] = {
                "scale": self.scale(which),
                "db_bytes": self.res["loads"][f"neonctl {which}"]["db_bytes"],
                "load1": loadavg()[0],
                "neonctl_cli_s": cli,
                "neonctl_api_s": api,
                "neonctl_version_s": noop,
                "vanilla_wal_log_s": wal_log,
                "vanilla_file_copy_s": file_copy,
                "median": {
                    "neonctl_cli": median(cli),
                    "neonctl_api": median(api),
                    "neonctl_version": median(noop),
                    "vanilla_wal_log": median(wal_log),
                    "vanilla_file_copy": median(file_copy),
                },
            }
        self.res["creation"] = out

    # ---- (b) storage of N branches with a small change each

    def storage(self) -> None:
        which = self.a.storage_parent
        n = self.a.branches
        p = self.load_project(which)
        src = self.vanilla_src(which)
        v = self.vanilla()
        dirs = self.env.storage_dirs(p)

        main_tl = timeline_of(p, "main")

        def neon_du(apparent: bool = False) -> dict[str, int]:  # daemon logs are not storage
            return {k: du_bytes(d, apparent=apparent, exclude="*.log") for k, d in dirs.items()}

        def parent_du() -> int:
            return du_bytes(*(d / "timelines" / main_tl for d in dirs.values()))

        wait_pageserver(p, "main")
        PageserverClient(p.pageserver_addr).checkpoint(main_tl, timeout=90)
        before = neon_du()
        before_apparent = neon_du(apparent=True)
        before_parent = parent_du()
        t_all = time.perf_counter()
        cycle = []
        for i in range(n):
            t = time.perf_counter()
            name = f"s{i}"
            create_branch(p, name, TimePoint("main"))
            st = endpoint_start(p, name)
            sql(
                st["port"],
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN %s AND %s",
                (i * 100 + 1, i * 100 + 100),
            )
            endpoint_stop(p, name, self.probs)
            cycle.append(round(time.perf_counter() - t, 2))
            log(f"(b) neonctl branch {i + 1}/{n}: create + start + UPDATE 100 rows + stop {cycle[-1]:.1f}s")
        neon_s = time.perf_counter() - t_all
        for i in range(n):  # everything ingested and frozen into layer files before measuring
            wait_pageserver(p, f"s{i}")
            PageserverClient.of(p).checkpoint(timeline_of(p, f"s{i}"), timeout=90)
        PageserverClient(p.pageserver_addr).checkpoint(main_tl, timeout=90)
        after = neon_du()
        after_apparent = neon_du(apparent=True)
        growth = {k: after[k] - before[k] for k in after}
        tl_sizes = {}
        for i in range(n):
            tl = timeline_of(p, f"s{i}")
            tl_sizes[f"s{i}"] = {k: du_bytes(d / "timelines" / tl) for k, d in dirs.items()}
        one = tl_sizes.get("s0", {})
        branch_dirs = sum(sum(x.values()) for x in tl_sizes.values())
        parent_growth = parent_du() - before_parent
        parts = {
            "branch timeline dirs": branch_dirs,
            "parent timeline dir": parent_growth,
            "rest (layer catalog, ...)": sum(growth.values()) - branch_dirs - parent_growth,
        }

        sql(v.port, "CHECKPOINT")
        vb = du_bytes(v.pgdata)
        vb_base = du_bytes(v.pgdata / "base")
        vb_wal = du_bytes(v.pgdata / "pg_wal")
        t_all = time.perf_counter()
        vcycle = []
        for i in range(n):
            t = time.perf_counter()
            sql(v.port, f"CREATE DATABASE c{i} TEMPLATE {src}")
            sql(
                v.port,
                "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN %s AND %s",
                (i * 100 + 1, i * 100 + 100),
                db=f"c{i}",
            )
            vcycle.append(round(time.perf_counter() - t, 2))
        van_s = time.perf_counter() - t_all
        log(f"(b) vanilla: {n} template copies + UPDATE in {van_s:.1f}s")
        sql(v.port, "CHECKPOINT")
        va = du_bytes(v.pgdata)
        va_base = du_bytes(v.pgdata / "base")
        va_wal = du_bytes(v.pgdata / "pg_wal")
        total = sum(growth.values())
        vgrowth = va - vb
        self.res["storage"] = {
            "parent": which,
            "scale": self.scale(which),
            "branches": n,
            "db_bytes": self.res["loads"][f"neonctl {which}"]["db_bytes"],
            "neonctl": {
                "growth_bytes": growth,
                "total_growth_bytes": total,
                "per_branch_bytes": total // n,
                "apparent_growth_bytes": {k: after_apparent[k] - before_apparent[k] for k in after},
                "one_branch_timeline_dirs_bytes": one,
                "before_bytes": before,
                "parts_bytes": parts,
                "seconds": round(neon_s, 1),
                "cycle_median_s": median(cycle),
            },
            "vanilla": {
                "growth_bytes": vgrowth,
                "base_growth_bytes": va_base - vb_base,
                "pg_wal_growth_bytes": va_wal - vb_wal,
                "per_copy_bytes": vgrowth // n,
                "before_bytes": vb,
                "seconds": round(van_s, 1),
                "cycle_median_s": median(vcycle),
            },
            "ratio_vanilla_over_neonctl": round(vgrowth / max(total, 1), 2),
            "ratio_vanilla_base_over_neonctl": round((va_base - vb_base) / max(total, 1), 2),
        }
        for i in range(n):
            sql(v.port, f"DROP DATABASE c{i}")

    # ---- (c) point-in-time restore

    def workload(self, port: int) -> str:
        """pgbench, marker 'before', T, marker 'after', pgbench; returns T (ISO 8601 with zone)."""
        sql(port, "CREATE TABLE IF NOT EXISTS marks (tag text, at timestamptz DEFAULT clock_timestamp())")
        txns = ["-c", "2", "-j", "2", "-t", str(self.a.pitr_txns)]
        pgbench(self.rt, port, txns, timeout=3600)
        sql(port, "INSERT INTO marks (tag) VALUES ('before')")
        time.sleep(1.0)
        t = datetime.now(UTC).isoformat()
        time.sleep(1.0)
        sql(port, "INSERT INTO marks (tag) VALUES ('after')")
        pgbench(self.rt, port, txns, timeout=3600)
        return t

    @staticmethod
    def marks(port: int) -> str:
        return ",".join(r[0] for r in sql(port, "SELECT tag FROM marks ORDER BY at"))

    def pitr(self) -> None:
        which = self.a.pitr_parent
        p = self.load_project(which)
        out: dict = {"parent": which, "scale": self.scale(which), "txns_per_client_per_phase": self.a.pitr_txns}

        # neonctl: workload on main, then a branch at T + start, then `branch restore main ^self@T`
        st = endpoint_start(p, "main")
        head0 = int(sql(st["port"], "SELECT pg_current_wal_insert_lsn() - '0/0'")[0][0])
        ts = self.workload(st["port"])
        head1 = int(sql(st["port"], "SELECT pg_current_wal_insert_lsn() - '0/0'")[0][0])
        out["neonctl_workload_wal_bytes"] = head1 - head0
        out["timestamp"] = ts
        wait_pageserver(p, "main")
        la = loadavg()[0]
        t = time.perf_counter()
        create_branch(p, "pitr_at_t", TimePoint("main", None, datetime.fromisoformat(ts)))
        create_s = time.perf_counter() - t
        bst = endpoint_start(p, "pitr_at_t")
        out["neonctl_branch_at_t"] = {
            "create_s": round(create_s, 3),
            "start_s": bst["total_s"],
            "total_s": round(create_s + bst["total_s"], 3),
            "load1": la,
            "marks": self.marks(bst["port"]),
            **{k: bst.get(k) for k in ("materialise_s", "redo_s", "wal_replayed_bytes", "made", "changed_pages")},
        }
        endpoint_stop(p, "pitr_at_t", self.probs)
        log(
            f"(c) neonctl branch at T + endpoint start: {create_s:.2f}s + {bst['total_s']:.2f}s, "
            f"marks {out['neonctl_branch_at_t']['marks']!r}"
        )
        wait_pageserver(p, "main")
        la = loadavg()[0]
        res, s, progress = run_cli(
            ["branch", "restore", "main", f"^self@{ts}", "-p", p.name, "-o", "json"], timeout=3600
        )
        after = read_state(p, "main")
        logtext = (Path(after.pgdata).parent / "postgres.log").read_text(errors="replace")
        out["neonctl_restore"] = {
            "total_s": round(s, 3),
            "load1": la,
            "marks": self.marks(after.port),
            "same_port": after.port == st["port"],
            "progress": progress,
            "phases": restore_phases(progress, s),
            **redo_info(logtext),
        }
        try:
            out["neonctl_restore"]["cli_output"] = json.loads(res)
        except ValueError:
            pass
        log(
            f"(c) neonctl branch restore main ^self@T (CLI, endpoint running): {s:.2f}s, "
            f"marks {out['neonctl_restore']['marks']!r}"
        )
        endpoint_stop(p, "main", self.probs)

        # vanilla: archive, base backup before the workload, same workload, restore to T
        v = self.env.vanilla("pitr")
        arch = v.dir / "archive"
        arch.mkdir()
        self.rt.chown(arch)
        v.configure(
            p, fsync=True, extra=f"archive_mode = on\narchive_command = 'test ! -f {arch}/%f && cp %p {arch}/%f'"
        )
        v.start()
        log(f"vanilla pitr: pgbench -i -s {self.scale(which)} ...")
        pgbench(self.rt, v.port, ["-i", "-q", "-s", str(self.scale(which))], timeout=7200)
        sql(v.port, "CHECKPOINT")
        base = v.dir / "base"
        t = time.perf_counter()
        self.rt.run(
            [
                self.rt.bin("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(v.port),
                "-U",
                "postgres",
                "-D",
                str(base),
                "-X",
                "stream",
                "-c",
                "fast",
            ],
            timeout=3600,
        )
        out["vanilla_basebackup_s"] = round(time.perf_counter() - t, 1)
        out["vanilla_basebackup_bytes"] = du_bytes(base, apparent=True)
        head0 = int(sql(v.port, "SELECT pg_current_wal_insert_lsn() - '0/0'")[0][0])
        vts = self.workload(v.port)
        head1 = int(sql(v.port, "SELECT pg_current_wal_insert_lsn() - '0/0'")[0][0])
        out["vanilla_workload_wal_bytes"] = head1 - head0
        out["vanilla_timestamp"] = vts
        seg = sql(v.port, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + 300
        while (sql(v.port, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")[0][0] or "") < seg:
            if time.monotonic() > deadline:
                raise RuntimeError(f"vanilla: WAL segment {seg} not archived after 300s")
            time.sleep(0.2)
        v.stop()  # as the neonctl restore stops the old compute (not timed on this side)
        r = Vanilla(self.rt, self.env.vroot, "pitr-restore")
        r.dir.mkdir()
        self.rt.chown(r.dir)
        self.env.vanillas.append(r)
        la = loadavg()[0]
        t0 = time.perf_counter()
        self.rt.run(["cp", "-a", str(base), str(r.pgdata)], timeout=3600)
        t1 = time.perf_counter()
        r.port = v.port
        conf = (r.pgdata / "postgresql.conf").read_text()
        conf += (
            f"\n# --- bench: point-in-time recovery ---\nport = {r.port}\nunix_socket_directories = '{r.dir}'\n"
            f"archive_mode = off\nhot_standby = off\nrestore_command = 'cp {arch}/%f %p'\n"
            f"recovery_target_time = '{vts}'\nrecovery_target_action = 'promote'\n"
        )
        (r.pgdata / "postgresql.conf").write_text(conf)
        (r.pgdata / "recovery.signal").write_text("")
        self.rt.chown(r.pgdata, recursive=True)
        r.start(timeout=3600)  # with hot_standby = off, pg_ctl -w may return while recovery still runs
        while True:
            try:
                if not sql(r.port, "SELECT pg_is_in_recovery()")[0][0]:
                    break
            except psycopg.OperationalError as e:
                if "not accepting connections" not in str(e) and "starting up" not in str(e):
                    raise
            time.sleep(0.05)
        t2 = time.perf_counter()
        logtext = r.logfile.read_text(errors="replace")
        out["vanilla_restore"] = {
            "copy_s": round(t1 - t0, 3),
            "recover_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3),
            "load1": la,
            "marks": self.marks(r.port),
            **redo_info(logtext),
        }
        log(
            f"(c) vanilla base backup copy {t1 - t0:.2f}s + recovery to T {t2 - t1:.2f}s, "
            f"marks {out['vanilla_restore']['marks']!r}"
        )
        r.stop()
        n_r, n_b, v_r = out["neonctl_restore"], out["neonctl_branch_at_t"], out["vanilla_restore"]
        out["correct"] = {
            "neonctl_restore": n_r["marks"] == "before",
            "neonctl_branch_at_t": n_b["marks"] == "before",
            "vanilla": v_r["marks"] == "before",
        }
        out["ratios"] = {
            "restore/vanilla_total": round(n_r["total_s"] / v_r["total_s"], 2),
            "branch_at_t/vanilla_total": round(n_b["total_s"] / v_r["total_s"], 2),
            "branch_at_t/vanilla_recover_only": round(n_b["total_s"] / v_r["recover_s"], 2),
        }
        # issue 16: both neonctl ways at least PITR_SPEEDUP x faster than the base backup + recovery_target_time
        out["speedup"] = {
            "vanilla_total/restore": round(v_r["total_s"] / n_r["total_s"], 2),
            "vanilla_total/branch_at_t": round(v_r["total_s"] / n_b["total_s"], 2),
        }
        out["speedup_target"] = {"at_least": PITR_SPEEDUP,
                                 "met": {k: v >= PITR_SPEEDUP for k, v in out["speedup"].items()}}
        self.res["pitr"] = out

    def run(self) -> None:
        parts = set(self.a.only.split(",")) if self.a.only else {"a", "b", "c"}
        self.res["parts"] = sorted(parts)
        if "a" in parts:
            self.creation()
        if "b" in parts:
            self.storage()
        if "c" in parts:
            self.pitr()
        if self.probs:
            self.env.problems["compute postgres.log"] = self.probs[:8]


def render(res: dict) -> list[str]:
    out = []
    loads = res.get("loads", {})
    if loads:
        out.append("")
        out.append(
            "loads: "
            + "; ".join(
                f"{k} -s {v['scale']}: {mb(v['db_bytes'])} MB in {v['load_s']:.0f}s"
                + (
                    f" (load1 {v['load1']}), pageserver caught up +{v['pageserver_catch_up_s']:.0f}s, "
                    f"image {v['image']} "
                    f"+{v['image_s']:.0f}s"
                    if k.startswith("neonctl")
                    else ""
                )
                + (f"  [OVER {LOAD_LIMIT_S}s]" if v.get("over_limit") else "")
                for k, v in loads.items()
            )
        )
    c = res.get("creation")
    if c:
        out.append("")
        out.append(f"(a) branch creation, median of {len(next(iter(c.values()))['neonctl_cli_s'])} (runs)")
        out.append(
            f"{'parent':<18}{'neonctl CLI':>12}{'engine API':>12}{'CREATE DATABASE TEMPLATE':>26}"
            f"{'FILE_COPY':>11}   ratios WAL_LOG/CLI, WAL_LOG/API, FILE_COPY/API"
        )
        for which, r in c.items():
            m = r["median"]
            out.append(
                f"{which + ' ' + str(mb(r['db_bytes'])) + ' MB':<18}{m['neonctl_cli']:>11.3f}s"
                f"{m['neonctl_api']:>11.3f}s{m['vanilla_wal_log']:>25.3f}s{m['vanilla_file_copy']:>10.3f}s   "
                f"{m['vanilla_wal_log'] / m['neonctl_cli']:.2f}x, {m['vanilla_wal_log'] / m['neonctl_api']:.1f}x, "
                f"{m['vanilla_file_copy'] / m['neonctl_api']:.1f}x"
            )
            out.append(f"{'':<18}  `neonctl --version` alone (CLI start-up): {m['neonctl_version']:.3f}s")
            out.append(
                f"{'':<18}  runs: CLI {' '.join(f'{x:.2f}' for x in r['neonctl_cli_s'])} | API "
                f"{' '.join(f'{x:.3f}' for x in r['neonctl_api_s'])} | WAL_LOG "
                f"{' '.join(f'{x:.2f}' for x in r['vanilla_wal_log_s'])} | FILE_COPY "
                f"{' '.join(f'{x:.2f}' for x in r['vanilla_file_copy_s'])}  (load1 {r['load1']})"
            )
    s = res.get("storage")
    if s:
        n, v = s["neonctl"], s["vanilla"]
        out.append("")
        out.append(
            f"(b) storage: {s['branches']} branches/copies of the {s['parent']} parent ({mb(s['db_bytes'])} MB), "
            f"UPDATE of 100 rows each (du, allocated)"
        )
        out.append(f"{'':<34}{'total growth':>14}{'per branch':>12}   split")
        out.append(
            f"{'neonctl pageserver + safekeepers':<34}{mb(n['total_growth_bytes']):>11} MB"
            f"{mb(n['per_branch_bytes']):>9} MB"
            "   "
            + ", ".join(f"{k} {mb(b)} MB" for k, b in n["growth_bytes"].items())
            + " (apparent size: "
            + ", ".join(f"{k} {mb(b)} MB" for k, b in n["apparent_growth_bytes"].items())
            + "); "
            + ", ".join(f"{k} {mb(b)} MB" for k, b in n["parts_bytes"].items())
        )
        out.append(
            f"{'vanilla base/ (the databases)':<34}{mb(v['base_growth_bytes']):>11} MB"
            f"{mb(v['base_growth_bytes'] // s['branches']):>9} MB   whole data dir {mb(v['growth_bytes'])} MB "
            f"(pg_wal {mb(v['pg_wal_growth_bytes'])} MB: recycled WAL, moves either way)"
        )
        out.append(
            f"ratio vanilla base/ / neonctl {s['ratio_vanilla_base_over_neonctl']}x (whole data dir: "
            f"{s['ratio_vanilla_over_neonctl']}x); one branch's timeline dirs: "
            + ", ".join(f"{k} {mb(b)} MB" for k, b in n["one_branch_timeline_dirs_bytes"].items())
            + f"; time per branch (create+start+UPDATE+stop) {n['cycle_median_s']}s vs per copy "
            f"(CREATE DATABASE+UPDATE) {v['cycle_median_s']}s"
        )
    pt = res.get("pitr")
    if pt:
        out.append("")
        out.append(
            f"(c) point-in-time restore of the {pt['parent']} parent (-s {pt['scale']}), pgbench -c 2 -t "
            f"{pt['txns_per_client_per_phase']} before and after T (WAL: neonctl "
            f"{mb(pt['neonctl_workload_wal_bytes'])} MB, vanilla {mb(pt['vanilla_workload_wal_bytes'])} MB)"
        )
        out.append(f"{'':<52}{'total':>8}  {'WAL replayed':>13}  {'correct':>7}  {'load1':>5}  detail")
        r, b, v = pt["neonctl_restore"], pt["neonctl_branch_at_t"], pt["vanilla_restore"]

        def walmb(d):
            x = d.get("wal_replayed_bytes")
            return f"{x / 2**20:.1f} MB" if x is not None else "?"

        ok = pt["correct"]
        out.append(
            f"{'neonctl branch restore main ^self@T (CLI)':<52}{r['total_s']:>7.2f}s  {walmb(r):>13}  "
            f"{ok['neonctl_restore']!s:>7}  {r['load1']:>5}  redo {r.get('redo_s')}s"
        )
        ph = r.get("phases", {})
        out.append(f"{'':<52}  restore phases: " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in ph.items()))
        out.append(
            f"{'neonctl create_branch @T + endpoint start (API)':<52}{b['total_s']:>7.2f}s  {walmb(b):>13}  "
            f"{ok['neonctl_branch_at_t']!s:>7}  {b['load1']:>5}  create {b['create_s']}s, start {b['start_s']}s "
            f"(materialise {b.get('materialise_s')}s, redo {b.get('redo_s')}s; directory {b.get('made')}"
            + (f" {b.get('changed_pages')} changed pages)" if b.get("made") == "rebuilt" else ")")
        )
        out.append(
            f"{'vanilla cp base backup + recovery_target_time':<52}{v['total_s']:>7.2f}s  {walmb(v):>13}  "
            f"{ok['vanilla']!s:>7}  {v['load1']:>5}  copy {v['copy_s']}s, recovery {v['recover_s']}s "
            f"(redo {v.get('redo_s')}s); base backup {mb(pt['vanilla_basebackup_bytes'])} MB took "
            f"{pt['vanilla_basebackup_s']}s (before, untimed)"
        )
        ra = pt["ratios"]
        out.append(
            f"ratios: restore/vanilla {ra['restore/vanilla_total']}x, branch@T+start/vanilla "
            f"{ra['branch_at_t/vanilla_total']}x, branch@T+start/vanilla recovery only "
            f"{ra['branch_at_t/vanilla_recover_only']}x"
        )
        if "speedup" in pt:
            sp, met = pt["speedup"], pt["speedup_target"]["met"]
            out.append(
                f"speed-up over cp base backup + recovery_target_time (vanilla/neonctl): restore "
                f"{sp['vanilla_total/restore']}x, branch@T+start {sp['vanilla_total/branch_at_t']}x; target >= "
                f"{pt['speedup_target']['at_least']:g}x: restore {'met' if met['vanilla_total/restore'] else 'MISSED'}"
                f", branch@T+start {'met' if met['vanilla_total/branch_at_t'] else 'MISSED'}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--small-scale", type=int, help="pgbench scale of the small parent (default 1, ~20 MB)")
    ap.add_argument("--large-scale", type=int, help="pgbench scale of the large parent (default 70, ~1 GB; --quick 3)")
    ap.add_argument("--reps", type=int, help="timed branch creations per parent and side (default 5; --quick 2)")
    ap.add_argument("--branches", type=int, help="branches / template copies for (b) (default 20; --quick 3)")
    ap.add_argument("--storage-parent", choices=["small", "large"], default="small", help="parent for (b)")
    ap.add_argument("--pitr-parent", choices=["small", "large"], default="large", help="parent for (c)")
    ap.add_argument("--pitr-txns", type=int, help="pgbench -t per client on each side of T (default 2000; --quick 100)")
    ap.add_argument("--only", help="comma-separated parts to run: a,b,c")
    a = ap.parse_args(argv)
    q = a.quick
    a.small_scale = a.small_scale or 1
    a.large_scale = a.large_scale or (3 if q else 70)
    a.reps = a.reps or (2 if q else 5)
    a.branches = a.branches or (3 if q else 20)
    a.pitr_txns = a.pitr_txns or (100 if q else 2000)
    return run_benchmark(a, "bench-branching", lambda env: Branching(env).run(), render)


if __name__ == "__main__":
    sys.exit(main())
