#!/usr/bin/env python3
"""What a pageserver image buys a compute start: `endpoint start` with all WAL since initdb to replay
against a start from a fresh image, and against `pg_ctl start -w` on a vanilla data directory.

    python benchmarks/bench_images.py [--pg-bin DIR] [--scale 6] [--reps 3] [--quick] [--json]

One run, one project whose pageserver never creates images on its own (image_creation_threshold set
out of reach), loaded with `pgbench -i -s SCALE` (~100 MB at 6) through an endpoint:

  (a) no image since initdb: `endpoint start` (engine API) median of REPS, stopped in between; every
      start materialises the initdb image and crash-recovers all WAL since;
  (b) CHECKPOINT on the compute, `POST /v1/timeline/{tl}/image` (timed; size of the image against the
      data directory), then `endpoint start` median of REPS again: replay starts at the image;
  peer: `pg_ctl start -w` on a cleanly shut down vanilla data directory loaded the same way (same
      binaries, the compute's settings minus the synchronous standby, fsync=on), median of REPS.

For every start the WAL it replayed (from the compute's log: `redo starts at` .. `redo done at`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
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
    sql,
    timeline_of,
    wait_pageserver,
)

from neonctl.engine.pageserver.client import PageserverClient  # noqa: E402


def starts(env: BenchEnv, p, label: str, reps: int, probs: list[str]) -> list[dict]:
    runs = []
    for i in range(reps):
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
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--scale", type=int, help="pgbench scale (default 6, ~100 MB; --quick 1)")
    ap.add_argument("--reps", type=int, help="timed starts per case (default 3; --quick 1)")
    a = ap.parse_args(argv)
    a.scale = a.scale or (1 if a.quick else 6)
    a.reps = a.reps or (1 if a.quick else 3)
    return run_benchmark(a, "bench-images", body, render)


if __name__ == "__main__":
    sys.exit(main())
