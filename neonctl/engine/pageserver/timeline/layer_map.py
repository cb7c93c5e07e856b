"""The layer map: which layer files cover which (key range x LSN range), and its durable index.

The index file (``index_part.json``, as Neon names it) is the commit point:
layer files are written and fsynced first, then the index that lists them,
and files are deleted only after an index without them is durable. On load,
files the index does not list (a crash between writing a layer and the index)
are removed, so the map is always exactly what the index says.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from neonctl.engine.pageserver.key import Key, KeyRange
from neonctl.engine.pageserver.storage_layer.layer_name import (
    DeltaLayerName,
    ImageLayerName,
    parse_layer_name,
)
from neonctl.engine.pageserver.workdir import INDEX


@dataclass
class LayerDesc:
    name: str
    kind: str  # "delta" | "image"
    level: int  # 0 for L0 deltas, 1 for compacted deltas, -1 for images
    key_start: str
    key_end: str
    lsn_start: int
    lsn_end: int  # exclusive; an image at LSN L has lsn_end = L + 1
    file_size: int
    num_values: int

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(Key.parse(self.key_start), Key.parse(self.key_end))

    @classmethod
    def from_name(cls, name: str, level: int, file_size: int, num_values: int) -> LayerDesc:
        n = parse_layer_name(name)
        if isinstance(n, DeltaLayerName):
            return cls(name, "delta", level, str(n.key_range.start), str(n.key_range.end), n.lsn_start, n.lsn_end,
                       file_size, num_values)
        assert isinstance(n, ImageLayerName)
        return cls(name, "image", -1, str(n.key_range.start), str(n.key_range.end), n.lsn, n.lsn + 1,
                   file_size, num_values)


class LayerMap:
    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.layers: dict[str, LayerDesc] = {}
        self.disk_consistent_lsn = 0
        self.extra: dict = {}  # other durable per-timeline facts (e.g. gc cutoff)
        self._ranges: dict[str, KeyRange] = {}

    def load(self, cleanup: bool = True) -> list[str]:
        """Read the index; delete files it does not list (unless told not to); return the names removed."""
        path = self.dir / INDEX
        if path.exists():
            doc = json.loads(path.read_text())
            self.disk_consistent_lsn = doc["disk_consistent_lsn"]
            self.extra = doc.get("extra", {})
            self.layers = {d["name"]: LayerDesc(**d) for d in doc["layers"]}
        self._ranges = {n: d.key_range for n, d in self.layers.items()}
        removed: list[str] = []
        if not cleanup:
            return removed
        for f in self.dir.iterdir():
            if f.name != INDEX and f.name not in self.layers:
                f.unlink()
                removed.append(f.name)
        return removed

    def save(self) -> None:
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the layer files' directory entries first
        finally:
            os.close(dfd)
        doc = {"disk_consistent_lsn": self.disk_consistent_lsn, "extra": self.extra,
               "layers": [asdict(d) for d in sorted(self.layers.values(), key=lambda d: (d.lsn_start, d.name))]}
        tmp = self.dir / (INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / INDEX)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def replace(self, add: list[LayerDesc], remove: list[str], disk_consistent_lsn: int | None = None) -> None:
        """Commit a change: new files are already on disk; old ones are deleted after the index."""
        for d in add:
            self.layers[d.name] = d
            self._ranges[d.name] = d.key_range
        for n in remove:
            self.layers.pop(n, None)
            self._ranges.pop(n, None)
        if disk_consistent_lsn is not None:
            self.disk_consistent_lsn = disk_consistent_lsn
        self.save()
        for n in remove:
            (self.dir / n).unlink(missing_ok=True)

    def search(self, key: Key, lsn_end: int) -> list[LayerDesc]:
        """Layers that may hold versions of key below lsn_end, newest first (images before deltas at ties).

        An image at I holds the page as of I (records starting below I applied), so it serves lsn_end = I too.
        """
        out = [d for n, d in self.layers.items()
               if (d.lsn_start <= lsn_end if d.kind == "image" else d.lsn_start < lsn_end)
               and self._ranges[n].contains(key)]
        out.sort(key=lambda d: (d.lsn_end if d.kind == "delta" else d.lsn_start + 1, d.kind == "image"), reverse=True)
        return out

    def l0(self) -> list[LayerDesc]:
        l0 = (d for d in self.layers.values() if d.kind == "delta" and d.level == 0)
        return sorted(l0, key=lambda d: d.lsn_start)

    def path(self, name: str) -> Path:
        return self.dir / name
