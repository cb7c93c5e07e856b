"""The TUI: layer-map rendering (pure) and the app against a real project (Textual Pilot)."""

import subprocess
import sys

from neonctl.tui.layer_map_render import render


def test_render_places_layers_by_key_rank_and_lsn():
    layers = [
        {"kind": "delta", "level": 0, "key_start": "00", "key_end": "FF", "lsn_start": 100, "lsn_end": 200},
        {"kind": "delta", "level": 1, "key_start": "00", "key_end": "80", "lsn_start": 0, "lsn_end": 100},
        {"kind": "image", "level": -1, "key_start": "80", "key_end": "FF", "lsn_start": 50, "lsn_end": 51},
    ]
    lines = render(layers, width=20, height=10)
    grid = lines[:-1]
    assert len(grid) == 10 and all(len(r) == 20 for r in grid)
    assert "░" in grid[0] and "▒" in grid[-1]  # newest on top, oldest at the bottom
    assert grid[-1].index("▒") == 0 and "━" in "".join(grid)
    assert "━" not in "".join(r[:10] for r in grid)  # the image covers the right half of the keys only
    assert render([]) == ["(no layers yet: WAL is still in the open in-memory layer)"]


def test_core_does_not_import_textual():
    code = "import neonctl.cli, sys; sys.exit(1 if 'textual' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_app_shows_branches_and_layer_map(pg18):
    import asyncio

    from neonctl.tui.app import NeonctlApp

    async def run():
        app = NeonctlApp(pg18, interval=0.5)
        async with app.run_test(size=(140, 40)) as pilot:
            for _ in range(60):
                await pilot.pause(0.1)
                if app.query_one("#branches").row_count:
                    break
            assert app.query_one("#branches").row_count >= 1
            assert app.query_one("#daemons").row_count == len(pg18.daemons())  # broker, sk1, pageserver, proxy
            text = app.layer_map_text
            assert "layer map of main" in text
            await pilot.press("q")

    asyncio.run(run())
