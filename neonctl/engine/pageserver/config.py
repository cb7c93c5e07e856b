"""Pageserver tuning knobs (Neon's names), with defaults sized for developer databases.

Stored as ``pageserver.json`` in the pageserver's workdir; Neon's production
defaults (256 MiB checkpoint distance, 10 L0s, ...) would mean a laptop
database never freezes a layer at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from neonctl.errors import InvalidInput


@dataclass
class PageserverConfig:
    checkpoint_distance: int = 16 << 20  # freeze the open layer after this much WAL
    checkpoint_timeout: float = 60.0  # ... or after it has been open this long (s)
    compaction_threshold: int = 4  # L0 layers that trigger an L0 -> L1 compaction
    compaction_target_size: int = 32 << 20  # bytes per L1 delta layer
    l0_backpressure: int = 12  # ingest waits for compaction beyond this many L0s
    image_creation_threshold: int = 3  # deltas above the newest image before a new one
    gc_horizon: int = 64 << 20
    pitr_interval: float = 7 * 86400.0
    gc_period: float = 3600.0  # periodic GC; 0 disables it
    # where timelines are offloaded (remote_storage.parse_url); None: the directory <project>/remote_storage/
    remote_storage: dict | None = None

    @classmethod
    def load(cls, workdir: Path) -> PageserverConfig:
        path = workdir / "pageserver.json"
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "pageserver.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, workdir / "pageserver.json")  # a crash leaves the old settings or the new, never half

    def set(self, name: str, value: str) -> None:
        kinds = {f.name: f.type for f in fields(self)}
        if name not in kinds:
            raise InvalidInput(f"unknown pageserver setting {name!r}", hint=", ".join(kinds))
        if kinds[name] not in (int, float, "int", "float"):
            raise InvalidInput(f"{name} is not a numeric setting", hint="neonctl project set --remote-storage URL")
        try:
            setattr(self, name, float(value) if kinds[name] in (float, "float") else int(value))
        except ValueError:
            raise InvalidInput(f"invalid value {value!r} for {name}") from None
