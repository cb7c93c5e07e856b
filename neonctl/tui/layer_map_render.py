"""Drawing a layer map as text: key space across, LSN upwards (pagectl draw-timeline-dir, in a terminal).

Pure function of the layer rows, so it is tested without a terminal. Key
positions are ranks of the distinct layer boundaries (real key distances span
2^144 and would squash everything into one column); LSNs are scaled linearly.
Deltas fill their rectangle with a level glyph, images are a horizontal bar.
"""

from __future__ import annotations

GLYPHS = {0: "░", 1: "▒"}
IMAGE = "━"


def render(layers: list[dict], width: int = 60, height: int = 16) -> list[str]:
    if not layers:
        return ["(no layers yet: WAL is still in the open in-memory layer)"]
    bounds = sorted({d["key_start"] for d in layers} | {d["key_end"] for d in layers})
    col = {k: round(i * (width - 1) / max(1, len(bounds) - 1)) for i, k in enumerate(bounds)}
    lo = min(d["lsn_start"] for d in layers)
    hi = max(d["lsn_end"] for d in layers)
    span = max(1, hi - lo)

    def row(lsn: int) -> int:
        return min(height - 1, (lsn - lo) * height // span)

    grid = [[" "] * width for _ in range(height)]
    for d in sorted(layers, key=lambda d: d["kind"] == "image"):
        c0, c1 = col[d["key_start"]], max(col[d["key_start"]] + 1, col[d["key_end"]])
        if d["kind"] == "image":
            r = row(d["lsn_start"])
            for c in range(c0, min(c1, width)):
                grid[r][c] = IMAGE
            continue
        r0, r1 = row(d["lsn_start"]), max(row(d["lsn_start"]), row(d["lsn_end"] - 1))
        g = GLYPHS.get(d["level"], "▓")
        for r in range(r0, r1 + 1):
            for c in range(c0, min(c1, width)):
                grid[r][c] = g
    lines = ["".join(r) for r in reversed(grid)]  # newest LSN on top
    lines.append(f"keys → ({len(bounds)} boundaries)   LSN ↑ {lo:X}..{hi:X}   ░ L0  ▒ L1  ━ image")
    return lines
