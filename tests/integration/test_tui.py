"""The explorer: map layout as pure functions, and the app against a real project (Textual Pilot)."""

import asyncio
import subprocess
import sys

import pytest
from conftest import connect, new_table, running_main

from neonctl.cli import main as cli_main
from neonctl.tui.map_layout import (
    MAX_KEY,
    MIN_KEY,
    Marker,
    Window,
    default_selection,
    layout,
    neighbor,
)


def K(c):
    return c * 36
LAYERS = [
    {"name": "img", "kind": "image", "level": -1, "key_start": MIN_KEY, "key_end": MAX_KEY, "lsn_start": 100,
     "lsn_end": 101},
    {"name": "l1a", "kind": "delta", "level": 1, "key_start": MIN_KEY, "key_end": K("8"), "lsn_start": 101,
     "lsn_end": 200},
    {"name": "l1b", "kind": "delta", "level": 1, "key_start": K("8"), "key_end": MAX_KEY, "lsn_start": 101,
     "lsn_end": 200},
    {"name": "l0", "kind": "delta", "level": 0, "key_start": K("4"), "key_end": K("C"), "lsn_start": 200,
     "lsn_end": 300},
]


def test_layout_places_layers_by_key_rank_and_lsn():
    lay = layout(LAYERS, width=40, height=20)
    assert lay.grid.shape == (20, 40) and lay.lsn_lo == 100 and lay.lsn_hi == 300
    names = [d["name"] for d in lay.layers]
    def at(x, y):
        return names[lay.at(x, y)]
    assert at(0, 19) == "img" and at(39, 19) == "img"  # the image is the bottom row, all keys
    assert at(0, 15) == "l1a" and at(39, 15) == "l1b"  # the L1s split the keys at the middle boundary
    assert at(20, 0) == "l0" and lay.at(0, 0) is None  # the L0 on top covers the middle keys only
    assert lay.at(40, 0) is None and lay.at(0, 20) is None


def test_window_and_markers():
    lay = layout(LAYERS, 40, 20, Window(K("0"), K("4"), label="left"), [Marker(150, "PITR", "pitr")])
    assert sorted(d["name"] for d in lay.layers) == ["img", "l1a"]  # l0 starts at the window's end
    assert [m.label for ms in lay.markers.values() for m in ms] == ["PITR"]
    zoomed = layout(LAYERS, 40, 20, Window(lsn_start=250, lsn_end=400))
    assert [d["name"] for d in zoomed.layers] == ["l0"]
    assert layout([], 10, 5).layers == [] and default_selection(layout([], 10, 5)) is None


def test_neighbor_moves_between_layers():
    lay = layout(LAYERS, 40, 20)
    idx = {d["name"]: i for i, d in enumerate(lay.layers)}
    def name(i):
        return lay.layers[i]["name"]
    assert name(default_selection(lay)) == "l1a"  # the newest layer at the left edge
    assert name(neighbor(lay, idx["l1a"], "right")) == "l0"  # next key boundary, closest in LSN
    assert name(neighbor(lay, idx["l0"], "right")) == "l1b"
    assert name(neighbor(lay, idx["l1b"], "left")) == "l0"
    assert name(neighbor(lay, idx["l1a"], "down")) == "img"
    assert name(neighbor(lay, idx["l1a"], "up")) == "l0"
    assert neighbor(lay, idx["l0"], "up") == idx["l0"]  # nothing newer: the cursor stays


def test_commands_do_not_import_textual_or_duckdb():
    code = ("import neonctl.cli, neonctl.commands.tui, neonctl.commands.inspect, sys;"
            "sys.exit(1 if {'textual', 'duckdb'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    code = (
        "import neonctl.engine.explorer.views, neonctl.engine.explorer.query, sys; sys.exit('textual' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.fixture(scope="module")
def explored(pg18):
    """pg18 with main running, a table with layers of its own, and a child branch."""
    with running_main(pg18):
        with connect(pg18) as conn:
            new_table(conn, "explorer_orders", "id int PRIMARY KEY, note text")
            conn.execute("INSERT INTO explorer_orders SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
        assert cli_main(["layers", "checkpoint", "-b", "main", "-p", pg18.name, "-o", "json"]) == 0
        assert cli_main(["branch", "create", "--name", "explorer-dev", "-p", pg18.name, "-o", "json"]) == 0
        try:
            yield pg18
        finally:
            cli_main(["branch", "delete", "explorer-dev", "-p", pg18.name, "-o", "json"])


async def _until(pilot, cond, what: str, timeout: float = 15.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_app_select_zoom_query_switch(explored):
    from neonctl.tui.app import create_app
    from neonctl.tui.widgets.layer_details import LayerDetails
    from neonctl.tui.widgets.layer_map import LayerMap

    async def run():
        app = create_app(explored, interval=0.5)
        async with app.run_test(size=(160, 44)) as pilot:
            m = app.screen.query_one(LayerMap)
            details = app.screen.query_one(LayerDetails)
            await _until(pilot, lambda: m.lay is not None and m.lay.layers, "the layer map")
            assert m.border_title == "layer map of main"
            assert "broker" in str(app.screen.query_one("#status").render())
            # select: the arrow moves the cursor to another layer and its details follow
            first = m.selected_layer["name"]
            await pilot.press("right")
            second = m.selected_layer["name"]
            assert second != first
            await _until(
                pilot,
                lambda: getattr(details, "details", None) and details.details["name"] == second,
                "the details of the selected layer",
            )
            assert set(details.details) >= {
                "kind",
                "level",
                "lsn_range",
                "file_size",
                "num_values",
                "compression",
                "relations",
                "time_start",
                "time_end",
                "start_rel",
            }
            # a click on a cell selects the layer drawn there
            lay = m.lay
            y, x = next(
                (y, x)
                for y in range(lay.height)
                for x in range(lay.width)
                if lay.at(x, y) is not None and lay.layers[lay.at(x, y)]["name"] != second
            )
            await pilot.click(LayerMap, offset=(x + 1, y + 1))  # +1: the border
            assert m.selected_layer["name"] == lay.layers[lay.at(x, y)]["name"]
            # zoom into a relation picked by name: only layers overlapping its keys remain; escape backs out
            await pilot.press("z")
            await pilot.press(*"explorer_orders", "enter")
            await _until(pilot, lambda: m.map_window.label == "explorer_orders", "the zoom")
            rel = app.db.rows("SELECT * FROM relations WHERE name = 'explorer_orders'")[0]
            assert m.lay.layers and all(
                d["key_start"] < rel["key_end"] and rel["key_start"] < d["key_end"] for d in m.lay.layers
            )
            assert len(m.lay.layers) <= len(m.map_layers) and m.lay.lsn_hi > m.lay.lsn_lo
            await pilot.press("escape")
            assert m.map_window.label == "whole key space" and len(m.lay.layers) == len(m.map_layers)
            # the console: a query over the same views, its result table and history
            await pilot.press("f3")
            console = app.screen
            editor = console.query_one("#editor")
            editor.text = "SELECT name, rel FROM relations WHERE name = 'explorer_orders'"
            await pilot.press("ctrl+r")
            table = console.query_one("#results")
            await _until(pilot, lambda: table.row_count == 1, "the query result")
            assert [str(c.label) for c in table.columns.values()] == ["name", "rel"]
            assert table.get_row_at(0)[0] == "explorer_orders"
            editor.text = "SELECT nope FROM layers"
            await pilot.press("ctrl+r")
            await _until(pilot, lambda: "nope" in str(console.query_one("#console-status").render()), "the error")
            assert console.query_one("#history").option_count == 2
            # switch branches in the tree: the map shows the child, with its parent's layers inherited
            await pilot.press("f2")
            tree = app.screen.query_one("#branches")
            node = next(n for n in tree._tree_nodes.values() if n.data == "explorer-dev")
            tree.select_node(node)
            await _until(pilot, lambda: m.border_title == "layer map of explorer-dev", "the branch switch")
            assert app.branch == "explorer-dev" and m.map_layers and all(d["inherited"] for d in m.map_layers)
            await pilot.press("q")

    asyncio.run(run())


def test_app_with_daemons_stopped_shows_stored_metadata(explored):
    """The same project read-only: a loader that sees the daemons stopped still draws the map."""
    from neonctl.engine.explorer.metadata import MetadataLoader
    from neonctl.tui.app import ExplorerApp
    from neonctl.tui.widgets.layer_map import LayerMap

    loader = MetadataLoader(explored)

    def stopped():
        snap = loader.load()
        snap.daemons = [{**d, "state": "stopped", "pid": None} for d in snap.daemons]
        return snap

    async def run():
        app = ExplorerApp(stopped, explored.name, "main", interval=None)
        async with app.run_test(size=(160, 44)) as pilot:
            m = app.screen.query_one(LayerMap)
            await _until(pilot, lambda: m.lay is not None and m.lay.layers, "the layer map")
            panel = app.screen.query_one("#status")
            assert panel.has_class("-stopped") and "daemons stopped" in str(panel.render())

    asyncio.run(run())
