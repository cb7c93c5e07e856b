"""Pageserver storage benchmark: WAL ingest speed against the WAL rate pgbench produces, and
read amplification before/after compaction.

    python benchmarks/bench_storage.py [--pg-bin DIR] [--seconds 20] [--scale 5] [--json]

One run: a vanilla Postgres (same binaries) runs pgbench for --seconds and we measure the WAL
rate it produced (the peer). Then that WAL is fed, in process, through (1) the record reader
(page headers + CRC-32C), (2) reader + full record decoder, (3) reader + decoder + layer store
(in-memory layer, L0 freeze, L1 compaction) - each reported in MB/s and as a multiple of the
pgbench WAL rate. Finally read amplification (layers a page lookup visits) is measured over
the produced layers before and after compaction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neonctl.engine.compute.runtime import resolve_runtime, shared_dir
from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.layer_catalog import LayerCatalog
from neonctl.engine.pageserver.layers import LayerStore
from neonctl.engine.ports import allocate
from neonctl.engine.wal.decoder import decode_record
from neonctl.engine.wal.reader import WalStreamDecoder


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
    d = WalStreamDecoder(start)
    d.feed(data)
    n = 0
    while d.poll() is not None:
        n += 1
    return n


def run_decoder(data: bytes, start: int, pg_version: int) -> int:
    d = WalStreamDecoder(start)
    d.feed(data)
    n = 0
    while (r := d.poll()) is not None:
        decode_record(r, pg_version)
        n += 1
    return n


def run_layers(data: bytes, start: int, pg_version: int, workdir: Path) -> tuple[int, LayerStore]:
    cfg = PageserverConfig(checkpoint_distance=8 << 20, compaction_threshold=1000, compaction_target_size=8 << 20)
    store = LayerStore(workdir, "0" * 32, pg_version, start, cfg)
    d = WalStreamDecoder(start)
    d.feed(data)
    n = 0
    while (r := d.poll()) is not None:
        store.put_record(r)
        n += 1
        if n % 2000 == 0:
            store.maybe_freeze()
    store.maybe_freeze(force=True)
    return n, store


def read_amp(store: LayerStore, workdir: Path) -> int:
    cat = LayerCatalog(workdir / "cat.duckdb")
    cat.sync("t", list(store.map.layers.values()))
    return cat.stats("t")["max_read_amplification"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg-bin")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = resolve_runtime(args.pg_bin)
    log(f"PostgreSQL {rt.version_string}: pgbench -s {args.scale} for {args.seconds}s to produce WAL ...")
    data, start, pgbench_rate = make_wal(rt, args.seconds, args.scale)
    mb = len(data) / 1e6
    res = {"postgres": rt.version_string, "wal_mb": round(mb, 1), "pgbench_wal_mb_s": round(pgbench_rate / 1e6, 2)}
    for name, fn in (("reader", lambda: run_reader(data, start)),
                     ("reader+decoder", lambda: run_decoder(data, start, rt.version))):
        log(f"{name} ...")
        t = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        res[f"{name}_mb_s"] = round(mb / dt, 1)
        res[f"{name}_records_s"] = round(n / dt)
    work = Path(tempfile.mkdtemp())
    try:
        log("reader+decoder+layers ...")
        t = time.perf_counter()
        n, store = run_layers(data, start, rt.version, work / "layers")
        dt = time.perf_counter() - t
        res["ingest_to_layers_mb_s"] = round(mb / dt, 1)
        res["layers_l0"] = len(store.map.l0())
        res["read_amp_before_compaction"] = read_amp(store, work)
        t = time.perf_counter()
        store.compact()
        res["compaction_s"] = round(time.perf_counter() - t, 2)
        res["layers_l1"] = len([d for d in store.map.layers.values() if d.level == 1])
        res["read_amp_after_compaction"] = read_amp(store, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k in ("reader_mb_s", "reader+decoder_mb_s", "ingest_to_layers_mb_s"):
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
