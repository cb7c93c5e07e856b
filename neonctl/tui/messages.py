"""Messages the explorer's workers and widgets post: immutable results, applied by `@on` handlers."""

from __future__ import annotations

from textual.message import Message

from neonctl.engine.explorer.metadata import StorageSnapshot
from neonctl.engine.explorer.views import MetadataDB


class SnapshotReady(Message):
    """A refresh finished: the stored metadata and its views (or why there are none)."""

    def __init__(self, snapshot: StorageSnapshot | None, db: MetadataDB | None, error: str | None = None) -> None:
        super().__init__()
        self.snapshot, self.db, self.error = snapshot, db, error


class BranchChosen(Message):
    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch


class MapData(Message):
    """A branch's layers and LSN markers, queried from the views."""

    def __init__(self, branch: str, layers: list[dict], markers: list[tuple[int, str, str]]) -> None:
        super().__init__()
        self.branch, self.layers, self.markers = branch, layers, markers


class DetailsReady(Message):
    def __init__(self, details: dict) -> None:
        super().__init__()
        self.details = details


class QueryDone(Message):
    def __init__(self, sql: str, columns: list[str], rows: list[tuple], ms: float, error: str | None,
                 total: int = 0) -> None:
        super().__init__()
        self.sql, self.columns, self.rows, self.ms, self.error, self.total = sql, columns, rows, ms, error, total
