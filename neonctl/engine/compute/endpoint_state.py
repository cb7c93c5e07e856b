"""What neonctl records about a running compute (`endpoints/<name>.json`): the model other modules share.

Kept apart from `endpoint.py` (which starts and stops computes) so that the proxy's suspend records and
listings can name an endpoint's state without importing the machinery that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neonctl.engine.lsn import format_lsn


@dataclass
class EndpointState:
    branch: str
    timeline_id: str
    port: int
    pgdata: str
    start_lsn: int
    started_at: float
    pg_version: int
    fsync: bool = False
    at_lsn: int | None = None  # a read-only time-travel endpoint frozen at this LSN (compute/time_travel.py)
    suspend_timeout: int | None = None  # seconds without a client before the proxy suspends it (None: default)
    # when the first compute that ran in this data directory started, if before start_lsn (a warm start
    # carried the directory over): the kept directory's record names it (pageserver/images/rebuild.py)
    directory_since_lsn: int | None = None

    @property
    def socket_dir(self) -> str:
        """The compute's own directory, 0700: its Unix socket, trusted, for neonctl and the proxy only."""
        return str(Path(self.pgdata).parent)

    @property
    def admin_dsn(self) -> str:
        """neonctl's superuser connection over the Unix socket (TCP clients need a password: see roles.py)."""
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={self.port}"

    @property
    def name(self) -> str:
        """Endpoint identity: the branch for its read-write compute, `branch@LSN` for a time-travel one."""
        return self.branch if self.at_lsn is None else f"{self.branch}@{format_lsn(self.at_lsn)}"
