"""The layer-map explorer at scale: map redraw and view queries over a generated 10,000-layer catalog.

    python benchmarks/bench_explorer.py [--layers 10000] [--repeat 20] [--json]

Targets (issue 15): the map redraws in <= 100 ms, a query over the views returns in <= 50 ms.

- `build_views_ms`: a snapshot's rows into DuckDB (once per refresh, in the TUI's poll worker).
- `layout_ms`: `map_layout.layout` for a 120x36 map (grid, ranks, painting): the pure part of a redraw.
- `redraw_ms`: the whole redraw in a real Textual app (headless, 160x44): new data set on the `LayerMap`
  widget (layout) plus every line rendered to strips, as the compositor asks for them.
- `move_ms`: one arrow-key move of the cursor (neighbour search + redraw of the lines).
- query figures: the median of --repeat runs each of the explorer's questions (relation's layers,
  a branch's layers by kind, what a branch shares with its parent, commit time at an LSN, GC) and the
  read-amplification sweep (every key boundary against every layer: the heaviest view).
Medians; the machine's other load shows in the spread (`*_max_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from neonctl.engine.explorer.generated import generated_snapshot
from neonctl.engine.explorer.views import MetadataDB
from neonctl.tui.map_layout import layout

QUERIES = {
    "relation_layers": "SELECT l.name, l.lsn_start, l.file_size FROM layers l JOIN relations r"
                       " ON r.name = 't0150' AND l.key_start < r.key_end AND r.key_start < l.key_end",
    "branch_by_kind": "SELECT kind, level, count(*), sum(file_size) FROM branch_layers WHERE branch = 'dev'"
                      " GROUP BY ALL",
    "shared_with_parent": "SELECT count(*), sum(file_size) FROM branch_layers WHERE branch = 'dev' AND inherited",
    "commit_time_at": "SELECT max(commit_time) FROM commits WHERE branch = 'main' AND lsn <= 8000000000",
    "branch_layers_all": "SELECT * FROM branch_layers WHERE branch = 'main' ORDER BY key_start, lsn_start, name",
}


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def redraw_in_app(snapshot, repeat: int) -> tuple[list[float], list[float]]:
    from neonctl.engine.explorer import queries
    from neonctl.tui.app import replay_app
    from neonctl.tui.map_layout import Marker
    from neonctl.tui.widgets.layer_map import LayerMap

    app = replay_app(snapshot)
    async with app.run_test(size=(160, 44)) as pilot:
        m = app.screen.query_one(LayerMap)
        for _ in range(400):
            if m.lay is not None and m.lay.layers:
                break
            await pilot.pause(0.05)
        layers = queries.branch_layers(app.db, "main")
        markers = [Marker(*x) for x in queries.lsn_markers(app.db, "main")]

        def redraw():
            m.set_data(layers, markers)
            for y in range(m.size.height):
                m.render_line(y)

        def move():
            m.action_move("right")
            for y in range(m.size.height):
                m.render_line(y)

        r = timed(redraw, repeat)
        mv = timed(move, repeat)
    return r, mv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    snap = generated_snapshot(a.layers)
    res: dict = {"layers": len(snap.layers), "commits": len(snap.commits), "relations": len(snap.relations)}
    t = time.perf_counter()
    db = MetadataDB(snap)
    res["build_views_ms"] = round((time.perf_counter() - t) * 1000, 1)
    main_layers = db.rows("SELECT * FROM branch_layers WHERE branch = 'main'")
    lay_t = timed(lambda: layout(main_layers, 120, 36), a.repeat)
    res["layout_ms"] = round(statistics.median(lay_t), 1)
    redraw, move = asyncio.run(redraw_in_app(snap, a.repeat))
    res["redraw_ms"], res["redraw_max_ms"] = round(statistics.median(redraw), 1), round(max(redraw), 1)
    res["move_ms"] = round(statistics.median(move), 1)
    for name, sql in QUERIES.items():
        ts = timed(lambda sql=sql: db.query(sql), a.repeat)
        res[f"query_{name}_ms"], res[f"query_{name}_max_ms"] = round(statistics.median(ts), 1), round(max(ts), 1)
    ts = timed(lambda: db.query("SELECT branch, max(read_amplification) FROM read_amplification GROUP BY ALL"),
               max(3, a.repeat // 4))
    res["query_read_amplification_ms"] = round(statistics.median(ts), 1)
    res["targets"] = {"redraw_ms <= 100": res["redraw_ms"] <= 100,
                      "queries <= 50": all(res[f"query_{n}_ms"] <= 50 for n in QUERIES)}
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k:40} {v}")


if __name__ == "__main__":
    main()
