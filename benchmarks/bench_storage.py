"""Pageserver storage benchmark: WAL ingest speed against the WAL rate pgbench produces, and
read amplification before/after compaction.

    python benchmarks/bench_storage.py [--pg-bin DIR] [--seconds 20] [--scale 5] [--json]

One run: a vanilla Postgres (same binaries) runs pgbench for --seconds and we measure the WAL
rate it produced (the peer). Then that WAL is fed, in process, through (1) the per-record Python
reader (page headers + CRC-32C; the pre-JIT baseline), (2) the JIT scan (page headers, CRC-32C,
record headers, block references), (3) the pageserver's ingest path on a real Timeline: receive
(scan, raw WAL store, commit log, fsync) in 1 MB messages, then the layer builder (entries, L0
delta layers written and fsynced), first one after the other, then on two threads as the
pageserver runs them (`ingest_mb_s`) - each in MB/s and as a multiple of the pgbench WAL rate.
Finally L0 -> L1 compaction is timed and read amplification (layers a page lookup visits) is
measured before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from neonctl.engine.compute.runtime import resolve_runtime, shared_dir
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.timeline.layer_catalog import LayerCatalog
from neonctl.engine.pageserver.timeline.layer_manager import LayerStore
from neonctl.engine.pageserver.timeline.timeline import Timeline, TimelineMetadata
from neonctl.engine.ports import allocate
from neonctl.engine.wal.reader import WalStreamDecoder
from neonctl.engine.wal.record_scan import scan_wal


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_wal(rt, seconds: int, scale: int) -> tuple[bytes, int, float]:
    d = Path(tempfile.mkdtemp(dir=shared_dir("bench-storage")))
    os.chmod(d, 0o755)
    pgdata = d / "data"
    pgdata.mkdir()
    rt.chown(d, recursive=True)
    port = allocate(57000, set())[0]
    try:
        rt.run([rt.bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-N"])
        with open(pgdata / "postgresql.conf", "a") as f:
            f.write(f"port={port}\nlisten_addresses='127.0.0.1'\nunix_socket_directories='{d}'\n"
                    "max_wal_size=8GB\nmin_wal_size=2GB\nwal_keep_size=4GB\n")
        rt.run([rt.bin("pg_ctl"), "start", "-w", "-D", str(pgdata), "-l", str(d / "log")])
        pg = [rt.bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        subprocess.run([*pg, "-i", "-q", "-s", str(scale), "postgres"], check=True, capture_output=True)
        psql = [rt.bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-Atc"]
        start = subprocess.run([*psql, "select pg_current_wal_insert_lsn() - '0/0'", "postgres"],
                               capture_output=True, text=True, check=True).stdout.strip()
        t = time.perf_counter()
        subprocess.run([*pg, "-T", str(seconds), "-c", "4", "-j", "2", "postgres"], check=True, capture_output=True)
        elapsed = time.perf_counter() - t
        end = subprocess.run([*psql, "select pg_current_wal_insert_lsn() - '0/0'", "postgres"],
                             capture_output=True, text=True, check=True).stdout.strip()
        rt.run([rt.bin("pg_ctl"), "stop", "-w", "-D", str(pgdata)])
        start_lsn, end_lsn = int(start), int(end)
        seg = 16 << 20
        first = start_lsn // seg
        data = bytearray()
        for segno in range(first, end_lsn // seg + 1):
            name = f"{1:08X}{segno // 256:08X}{segno % 256:08X}"
            data += (pgdata / "pg_wal" / name).read_bytes()
        data = bytes(data[: end_lsn - first * seg])
        return data, first * seg, (end_lsn - start_lsn) / elapsed
    finally:
        subprocess.run([rt.bin("pg_ctl"), "stop", "-m", "immediate", "-D", str(pgdata)], capture_output=True,
                       **rt.popen_kwargs())
        shutil.rmtree(d, ignore_errors=True)


def run_reader(data: bytes, start: int) -> int:
    """The per-record Python reader (page headers, CRC): the pre-JIT baseline."""
    d = WalStreamDecoder(start)
    d.feed(data)
    n = 0
    while d.poll() is not None:
        n += 1
    return n


def run_scan(data: bytes, start: int) -> int:
    """The JIT scan: page headers, CRC-32C, record headers and block references, 16 MB at a time."""
    pos, n, prev = start, 0, None
    view = memoryview(data)
    while pos < start + len(data):
        b = scan_wal(view[pos - start: pos - start + (16 << 20)], pos, prev_lsn=prev)
        if not len(b):
            break
        n += len(b)
        pos, prev = b.end_lsn, int(b.lsn[-1])
    return n


def make_timeline(workdir: Path, start: int, pg_version: int) -> Timeline:
    """A pageserver timeline whose own WAL starts at `start` (no image: only ingest is measured)."""
    d = workdir / "timelines" / ("0" * 32)
    d.mkdir(parents=True)
    meta = TimelineMetadata(timeline_id="0" * 32, pg_version=pg_version, system_id=0, ancestor_timeline=None,
                            ancestor_lsn=0, initdb_lsn=start, base_checkpoint_lsn=start, base_redo_lsn=start,
                            last_record_lsn=start, start_lsn=start)
    (d / "metadata.json").write_text(json.dumps(asdict(meta)))
    return Timeline(d)


def receive(tl: Timeline, data: bytes, start: int) -> None:
    """Feed the WAL to the timeline in 1 MB messages, as the walreceiver gets them, and make it durable."""
    pos = start
    while pos < start + len(data):
        end = tl.ingest(pos, data[pos - start: pos - start + (1 << 20)])
        if end == pos:
            break
        pos = end
    tl.sync_if_due(force=True)


def run_ingest(data: bytes, start: int, pg_version: int, workdir: Path) -> tuple[Timeline, float, float]:
    """The pageserver's path: receive (scan, store raw WAL, commit log) in 1 MB messages as the walreceiver
    gets them, then the layer builder (scan, entries, L0 freezes at the default checkpoint_distance)."""
    tl = make_timeline(workdir, start, pg_version)
    tl.attach_layers(PageserverConfig(compaction_threshold=1000))
    t = time.perf_counter()
    receive(tl, data, start)
    t_receive = time.perf_counter() - t
    t = time.perf_counter()
    while tl.build_layers():
        pass
    tl.layers.maybe_freeze(force=True)
    return tl, t_receive, time.perf_counter() - t


def run_pipeline(data: bytes, start: int, pg_version: int, workdir: Path) -> float:
    """Receive and layer building at once, on two threads, as the pageserver runs them; seconds until the
    layers have caught up with the last byte (the kernels release the GIL, so they overlap)."""
    tl = make_timeline(workdir, start, pg_version)
    tl.attach_layers(PageserverConfig(compaction_threshold=1000))
    done = threading.Event()

    def build() -> None:
        while not (done.is_set() and tl.layer_lsn >= tl.last_record_lsn):
            if not tl.build_layers():
                time.sleep(0.001)

    builder = threading.Thread(target=build)
    t = time.perf_counter()
    builder.start()
    receive(tl, data, start)
    done.set()
    builder.join()
    tl.layers.maybe_freeze(force=True)
    elapsed = time.perf_counter() - t
    tl.layers.close()
    return elapsed


def read_amp(store: LayerStore, workdir: Path) -> int:
    cat = LayerCatalog(workdir / "cat.duckdb")
    cat.sync("t", list(store.map.layers.values()))
    return cat.stats("t")["max_read_amplification"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg-bin")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = resolve_runtime(args.pg_bin)
    log(f"PostgreSQL {rt.version_string}: pgbench -s {args.scale} for {args.seconds}s to produce WAL ...")
    data, start, pgbench_rate = make_wal(rt, args.seconds, args.scale)
    mb = len(data) / 1e6
    res = {"postgres": rt.version_string, "wal_mb": round(mb, 1), "pgbench_wal_mb_s": round(pgbench_rate / 1e6, 2)}
    warm = Path(tempfile.mkdtemp())  # JIT: load (or compile) every kernel outside the timings
    run_ingest(data[: 4 << 20], start, rt.version, warm)[0].layers.compact()
    shutil.rmtree(warm, ignore_errors=True)
    for name, fn in (("python_reader", lambda: run_reader(data, start)), ("scan", lambda: run_scan(data, start))):
        log(f"{name} ...")
        t = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        res[f"{name}_mb_s"] = round(mb / dt, 1)
        res[f"{name}_records_s"] = round(n / dt)
    work = Path(tempfile.mkdtemp())
    try:
        log("pageserver ingest: receive + layers ...")
        tl, t_recv, t_layers = run_ingest(data, start, rt.version, work)
        store = tl.layers
        res["receive_mb_s"] = round(mb / t_recv, 1)
        res["layer_build_mb_s"] = round(mb / t_layers, 1)
        res["ingest_serial_mb_s"] = round(mb / (t_recv + t_layers), 1)
        log("pageserver ingest: receive and layers on two threads ...")
        res["ingest_mb_s"] = round(mb / run_pipeline(data, start, rt.version, work / "pipeline"), 1)
        res["layers_l0"] = len(store.map.l0())
        res["l0_bytes"] = sum(d.file_size for d in store.map.l0())
        res["read_amp_before_compaction"] = read_amp(store, work)
        t = time.perf_counter()
        store.compact()
        res["compaction_s"] = round(time.perf_counter() - t, 2)
        res["compaction_mb_s"] = round(res["l0_bytes"] / 1e6 / max(res["compaction_s"], 1e-9), 1)
        res["layers_l1"] = len([d for d in store.map.layers.values() if d.level == 1])
        res["read_amp_after_compaction"] = read_amp(store, work)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k in ("python_reader_mb_s", "scan_mb_s", "ingest_mb_s"):
        res[k.replace("_mb_s", "_x_pgbench")] = round(res[k] / max(res["pgbench_wal_mb_s"], 1e-9), 1)
    res["load_average"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        w = max(len(k) for k in res)
        for k, v in res.items():
            print(f"{k.ljust(w)}  {v}")


if __name__ == "__main__":
    main()
