"""Reading a data directory's pg_control through ``pg_controldata``.

The pageserver needs the checkpoint location, its redo point and the system
identifier of an imported base; pg_controldata's text is stable across 15-18.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from neonctl.engine.lsn import parse_lsn
from neonctl.errors import PostgresError


@dataclass(frozen=True)
class ControlData:
    system_id: int
    state: str
    checkpoint_lsn: int
    redo_lsn: int
    raw: dict[str, str]


def read_control_data(bin_dir: Path, pgdata: Path) -> ControlData:
    proc = subprocess.run([str(bin_dir / "pg_controldata"), "-D", str(pgdata)],
                          capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise PostgresError(f"pg_controldata failed on {pgdata}: {proc.stderr.strip()}")
    raw = {}
    for line in proc.stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            raw[k.strip()] = v.strip()
    return ControlData(
        system_id=int(raw["Database system identifier"]),
        state=raw["Database cluster state"],
        checkpoint_lsn=parse_lsn(raw["Latest checkpoint location"]),
        redo_lsn=parse_lsn(raw["Latest checkpoint's REDO location"]),
        raw=raw,
    )
