"""SVG snapshots of the explorer's screens on a fixed recorded layer set (deterministic: no project).

The snapshot is `tests/snapshots/explorer_recorded.json`, recorded from a real project (two
branches, an initdb image, L1 and L0 deltas, commits, relation names). Update the SVGs with
`pytest tests/unit/test_tui_snapshots.py --snapshot-update` after an intended change, and look at them.
"""

from pathlib import Path

from neonctl.engine.explorer.metadata import StorageSnapshot

RECORDED = Path(__file__).parents[1] / "snapshots" / "explorer_recorded.json"
SIZE = (150, 40)


def _app():
    from neonctl.tui.app import replay_app

    return replay_app(StorageSnapshot.from_json(RECORDED.read_text()))


async def _loaded(pilot):
    from neonctl.tui.widgets.layer_map import LayerMap

    m = pilot.app.screen.query_one(LayerMap)
    for _ in range(200):
        if m.lay is not None and m.lay.layers and getattr(pilot.app.screen.query_one("#details"), "details", None):
            break
        await pilot.pause(0.05)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def test_map_screen(snap_compare):
    async def run_before(pilot):
        await _loaded(pilot)
        await pilot.press("right", "up")
        await pilot.pause(0.3)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_map_zoomed_into_relation(snap_compare):
    async def run_before(pilot):
        await _loaded(pilot)
        await pilot.press("z")
        await pilot.pause(0.2)  # the picker's filter box has the focus
        await pilot.press(*"orders", "enter")
        await pilot.pause(0.3)
        assert pilot.app.screen.query_one("#layermap").map_window.label == "orders"

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_console_screen(snap_compare):
    async def run_before(pilot):
        await _loaded(pilot)
        await pilot.press("f3")
        await pilot.pause(0.1)
        await pilot.press("ctrl+r")
        for _ in range(100):
            if pilot.app.screen.query_one("#results").row_count:
                break
            await pilot.pause(0.05)
        status = pilot.app.screen.query_one("#console-status")
        status.update(str(status.render()).split(" in ")[0])  # the timing varies
        pilot.app.screen.query_one("#editor").blur()
        await pilot.pause(0.1)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_charts_screen(snap_compare):
    async def run_before(pilot):
        await _loaded(pilot)
        await pilot.press("f4")
        for _ in range(100):
            if pilot.app.screen.data is not None:
                break
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    async def run_before(pilot):
        await _loaded(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.1)

    assert snap_compare(_app(), terminal_size=SIZE, run_before=run_before)
