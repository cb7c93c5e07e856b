"""Wall-clock seconds <-> Postgres TimestampTz (microseconds since 2000-01-01 UTC)."""

PG_EPOCH_UNIX = 946_684_800


def to_pg_us(unix_seconds: float) -> int:
    return int((unix_seconds - PG_EPOCH_UNIX) * 1_000_000)
