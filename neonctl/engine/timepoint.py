"""Points in a branch's history: `branch@0/16B3748`, `branch@2026-11-23T10:00:00Z`, or just a branch.

LSNs look like Neon's (`^[0-9A-F]{1,8}/[0-9A-F]{1,8}$`); timestamps are
ISO-8601/RFC 3339 with a zone. Postgres counts time in microseconds since
2000-01-01 UTC, and so do commit records, so timestamps convert to that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from neonctl.engine.lsn import parse_lsn
from neonctl.errors import InvalidInput

_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)  # Postgres timestamps count microseconds from here
PG_EPOCH_UNIX = 946_684_800  # the same instant in Unix seconds


@dataclass(frozen=True)
class TimePoint:
    branch: str | None
    lsn: int | None = None
    timestamp: datetime | None = None

    @property
    def timestamp_us(self) -> int | None:
        return None if self.timestamp is None else to_pg_us(self.timestamp)


def to_pg_us(ts: datetime) -> int:
    delta = ts - PG_EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_pg_us(us: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=us)


def unix_to_pg_us(unix_seconds: float) -> int:
    """Wall-clock seconds (time.time()) as a Postgres TimestampTz."""
    return int((unix_seconds - PG_EPOCH_UNIX) * 1_000_000)


def is_lsn(text: str) -> bool:
    return bool(_LSN_RE.match(text))


def parse_timestamp(text: str) -> datetime:
    try:
        ts = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise InvalidInput(
            f"invalid timestamp {text!r}: expected ISO-8601 with a zone, e.g. 2026-11-23T10:00:00Z"
        ) from None
    if ts.tzinfo is None:
        raise InvalidInput(f"timestamp {text!r} has no time zone: add Z or +HH:MM")
    if ts > datetime.now(timezone.utc):
        raise InvalidInput(f"timestamp {text} is in the future")
    return ts


def looks_like_timestamp(text: str) -> bool:
    return bool(re.match(r"^\d{4}-\d{2}-\d{2}", text))


def parse_point(text: str) -> tuple[str | None, int | None, datetime | None]:
    """`X` where X is an LSN, a timestamp or a branch name (returned as such)."""
    if is_lsn(text):
        return None, parse_lsn(text), None
    if looks_like_timestamp(text):
        return None, None, parse_timestamp(text)
    return text, None, None


def parse_ref(text: str) -> TimePoint:
    """`branch`, `branch@LSN`, `branch@TIMESTAMP`, or a bare LSN/timestamp (branch = None: the default)."""
    if "@" in text:
        branch, _, point = text.partition("@")
        if not branch:
            raise InvalidInput(f"invalid reference {text!r}: expected BRANCH@LSN or BRANCH@TIMESTAMP")
        name, lsn, ts = parse_point(point)
        if name is not None:
            raise InvalidInput(
                f"invalid point {point!r} in {text!r}: expected an LSN like 0/16B3748 or an ISO-8601 timestamp"
            )
        return TimePoint(branch, lsn, ts)
    name, lsn, ts = parse_point(text)
    return TimePoint(name, lsn, ts)


def parse_ref_with(ref: str | None, lsn: str | None = None, timestamp: str | None = None,
                   what: str = "the point") -> TimePoint:
    """`ref` (as parse_ref) with the CLI's --lsn/--timestamp options folded in; each point given once."""
    point = parse_ref(ref) if ref else TimePoint(None)
    if lsn is not None and timestamp is not None:
        raise InvalidInput("give --lsn or --timestamp, not both")
    if (lsn is not None or timestamp is not None) and (point.lsn is not None or point.timestamp is not None):
        raise InvalidInput(f"{what} is given twice (in {ref!r} and in --lsn/--timestamp)")
    return TimePoint(point.branch, parse_lsn(lsn) if lsn else point.lsn,
                     parse_timestamp(timestamp) if timestamp else point.timestamp)

