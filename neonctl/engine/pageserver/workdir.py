"""The pageserver's directory layout: where each timeline's files live under its work directory.

Kept apart from `timeline.py` so that code which only needs to find or list
timelines (project settings, remote restore, the CLI) does not load the layer
and image machinery (numpy, numba) with them.
"""

from __future__ import annotations

from pathlib import Path

INDEX = "index_part.json"  # a timeline's layer index, in its layers/ directory and on the remote, as in Neon


def timeline_dir(workdir: Path, timeline_id: str) -> Path:
    return workdir / "timelines" / timeline_id


def list_timelines(workdir: Path) -> list[str]:
    d = workdir / "timelines"
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / "metadata.json").exists())


DELETED_PREFIX = ".deleted-"  # a timeline directory moved aside by a delete: removed, never loaded
