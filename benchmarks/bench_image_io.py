#!/usr/bin/env python3
"""Image I/O: CPU and wall time of `create_image` (stopped data directory -> image layers) and
`restore_image` (image layers -> data directory), in process, on a pgbench database.

    python benchmarks/bench_image_io.py [--pg-bin DIR] [--scale 6] [--reps 5] [--quick] [--json]

A vanilla cluster (initdb, `pgbench -i -s SCALE`, ~100 MB at 6) is stopped cleanly. After one untimed
round, REPS times: create its image into a fresh directory, restore that into a fresh directory. For
each step the median wall time, CPU time of this process (user + system, all threads) and MB/s of
uncompressed values. Restoring creates one file per relation fork segment, and on some VMs creating a
file in a new directory under /var/lib/neonctl costs ~1 ms of kernel CPU: the same files are also
created empty on their own, so that cost can be told apart from the restore's own work.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
    bench_parser,
    du_bytes,
    log,
    mb,
    pgbench,
    run_benchmark,
)

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.pageserver.images.create import create_image
from neonctl.engine.pageserver.images.restore import restore_image
from neonctl.engine.ports import ephemeral_port  # noqa: E402


class Timer:
    """Wall and CPU seconds (user, system) of this process between enter and exit."""

    def __enter__(self) -> Timer:
        self.t, self.ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall = time.perf_counter() - self.t
        self.user, self.sys = ru.ru_utime - self.ru.ru_utime, ru.ru_stime - self.ru.ru_stime

    def row(self) -> dict:
        return {"wall_s": self.wall, "user_s": self.user, "sys_s": self.sys, "cpu_s": self.user + self.sys}


def create_empty(tree: Path, target: Path) -> int:
    """The files and directories of ``tree``, empty, under ``target``; returns the number of files."""
    n = 0
    for dirpath, _, files in os.walk(tree):
        rel = Path(dirpath).relative_to(tree)
        (target / rel).mkdir(exist_ok=True)
        for f in files:
            os.close(os.open(target / rel / f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            n += 1
    return n


def body(env: BenchEnv) -> None:
    a = env.args
    van = env.vanilla("image-io")
    van.port = ephemeral_port()
    (van.pgdata / "postgresql.conf").write_text(
        van.base_conf + f"\nport = {van.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{van.dir}'\n")
    van.start()
    log(f"vanilla: pgbench -i -s {a.scale} ...")
    pgbench(env.rt, van.port, ["-i", "-q", "-s", str(a.scale)], timeout=3600)
    van.stop()
    cd = read_control_data(env.rt.bin_dir, van.pgdata)
    work = env.vroot / "work"
    work.mkdir()
    runs: dict[str, list[dict]] = {"create_image": [], "restore_image": [], "create_files": []}
    for rep in range(a.reps + 1):
        layers, restored, empty = work / f"layers{rep}", work / f"restored{rep}", work / f"empty{rep}"
        with Timer() as c:
            info = create_image(van.pgdata, layers, "0" * 32, cd.checkpoint_lsn, cd.checkpoint_lsn, cd.redo_lsn)
        with Timer() as r:
            restore_image(info.paths, restored)
        with Timer() as f:
            files = create_empty(restored, empty)
        if rep:  # the first round warms the page cache and loads the JIT-compiled kernels
            for name, t in (("create_image", c), ("restore_image", r), ("create_files", f)):
                runs[name].append(t.row())
        log(
            f"round {rep}/{a.reps}{' (untimed)' if not rep else ''}: "
            f"create {c.wall:.3f}s wall {c.user + c.sys:.3f}s cpu,"
            f" restore {r.wall:.3f}s wall {r.user + r.sys:.3f}s cpu, {files} empty files {f.wall:.3f}s"
        )
        for d in (layers, restored, empty):
            shutil.rmtree(d)
    env.result["image_io"] = {
        "scale": a.scale,
        "reps": a.reps,
        "pgdata_bytes": du_bytes(van.pgdata, apparent=True, exclude="pg_wal"),
        "raw_bytes": info.raw_bytes,
        "image_bytes": info.file_size,
        "layers": len(info.layers),
        "files": files,
        "runs": runs,
        "median": {
            name: {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]} for name, rs in runs.items()
        },
    }


def render(res: dict) -> list[str]:
    r = res.get("image_io")
    if not r:
        return []
    raw = r["raw_bytes"] / 2**20
    out = [
        "",
        f"image I/O, pgbench -s {r['scale']}: data directory {mb(r['pgdata_bytes'])} MB without pg_wal, "
        f"{raw:.1f} MB of values -> {mb(r['image_bytes'])} MB in {r['layers']} layer file(s); "
        f"median of {r['reps']}",
        f"{'':<34}{'wall s':>8}{'cpu s':>8}{'user s':>8}{'sys s':>8}{'MB/s wall':>11}{'MB/s cpu':>10}",
    ]
    for name, label in (
        ("create_image", "create_image"),
        ("restore_image", "restore_image"),
        ("create_files", f"  creating its {r['files']} files alone"),
    ):
        m = r["median"][name]
        rates = f"{raw / m['wall_s']:>11.0f}{raw / m['cpu_s']:>10.0f}" if name != "create_files" else ""
        out.append(f"{label:<34}{m['wall_s']:>8.3f}{m['cpu_s']:>8.3f}{m['user_s']:>8.3f}{m['sys_s']:>8.3f}{rates}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--scale", type=int, help="pgbench scale (default 6; --quick 1)")
    ap.add_argument("--reps", type=int, help="timed rounds (default 5; --quick 1)")
    args = ap.parse_args(argv)
    args.scale = args.scale or (1 if args.quick else 6)
    args.reps = args.reps or (1 if args.quick else 5)
    return run_benchmark(args, "bench-image-io", body, render)


if __name__ == "__main__":
    sys.exit(main())
