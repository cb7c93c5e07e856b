"""Repair without peers: a lone safekeeper's damaged timeline rebuilt at the end of the pageserver's WAL.

With one safekeeper there is no peer to copy from. What survives is the pageserver's copy of the WAL: it
ingests only committed WAL in whole records, so its ``last_record_lsn`` L is a record boundary of this
timeline's history, and the CLI has the pageserver make everything below L durable before it asks for the
repair (``POST /v1/timeline/{tl}/sync``). The CLI reads the pageserver and sends the result as JSON values
(``PageserverPoint``); the safekeeper itself never talks to the pageserver.

The timeline is rebuilt in the shape of a freshly created one that starts at L (``create_timeline``): start =
flush = commit = L, no WAL bytes. No WAL is copied back from the pageserver, because nobody reads WAL below L
from the safekeeper again:

- an endpoint start elects the next term at the safekeeper's flush LSN, L, waits for the pageserver to hold
  WAL up to there and has it materialise the compute at L; the safekeeper then streams the compute's WAL
  from L on (``START_REPLICATION`` at its write LSN);
- the pageserver's WAL receiver asks from its own ``last_record_lsn``, L, and the safekeeper serves WAL from
  its ``wal_start_lsn``, L;
- peer recovery, the only other reader, has no peers here.

Kept from the damaged copy when its control file is readable: the term (a vote given is never given again)
and the term history up to L (switches at or below L, so the history is consistent with WAL ending at L).
Dropped: the attached compute (the CLI stops it, its data directory may be ahead of L).

What is lost is the WAL in [L, F), F being the flush LSN the damaged control file recorded: it existed only
here. F is rewritten at every clean stop and about once a second while WAL flows, so after a crash the WAL of
that last second may be missing too, beyond F. With an unreadable control file the amount beyond L is unknown.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from neonctl.engine.lsn import WAL_SEGMENT_SIZE, format_lsn
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.timeline import BrokenTimeline, SkTimeline
from neonctl.errors import Conflict, InvalidInput


@dataclass(frozen=True)
class PageserverPoint:
    """Where the pageserver's durable WAL of the timeline ends, and the timeline's constants."""

    last_record_lsn: int
    system_id: int
    pg_version: int
    wal_seg_size: int = WAL_SEGMENT_SIZE

    @classmethod
    def from_json(cls, obj: object) -> PageserverPoint:
        """Validate the repair request's ``pageserver`` object: non-negative integers, nothing else."""
        if not isinstance(obj, dict):
            raise InvalidInput("repair: `pageserver` must be an object {last_record_lsn, system_id, pg_version}")
        unknown = set(obj) - {"last_record_lsn", "system_id", "pg_version", "wal_seg_size"}
        if unknown:
            raise InvalidInput(f"repair: unknown `pageserver` fields {sorted(unknown)}")
        values = {}
        for name in ("last_record_lsn", "system_id", "pg_version", "wal_seg_size"):
            v = obj.get(name, WAL_SEGMENT_SIZE if name == "wal_seg_size" else None)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 1 << 64:
                raise InvalidInput(f"repair: `pageserver.{name}` must be a non-negative 64-bit integer, got {v!r}")
            values[name] = v
        if values["wal_seg_size"] == 0 or values["wal_seg_size"] & (values["wal_seg_size"] - 1):
            raise InvalidInput(f"repair: `pageserver.wal_seg_size` {values['wal_seg_size']} is not a power of two")
        return cls(**values)


def loss(broken: BrokenTimeline, lsn: int) -> dict:
    """What the rebuild at `lsn` loses, as the repair reports it: the range, its size, and one sentence."""
    at = format_lsn(lsn)
    if broken.state is None:
        return {"lost_from": at, "lost_to": None, "lost_bytes": None,
                "summary": f"rebuilt at {at} from the pageserver's WAL; the control file was unreadable, so how "
                           f"much WAL beyond {at} existed only on this safekeeper (and is now lost) is unknown"}
    flushed = broken.state.flush_lsn
    if flushed <= lsn:
        return {"lost_from": None, "lost_to": None, "lost_bytes": 0,
                "summary": f"rebuilt at {at} from the pageserver's WAL, which holds all the WAL this safekeeper "
                           f"had recorded as flushed ({format_lsn(flushed)}): nothing is lost"}
    n = flushed - lsn
    return {"lost_from": at, "lost_to": format_lsn(flushed), "lost_bytes": n,
            "summary": f"rebuilt at {at} from the pageserver's WAL; the WAL from {at} to {format_lsn(flushed)} "
                       f"({n} bytes) existed only on this safekeeper and is lost"}


def rebuild(broken: BrokenTimeline, point: PageserverPoint) -> tuple[SkTimeline, dict]:
    """Replace the damaged copy by an empty timeline starting at the pageserver's WAL end (blocking I/O).

    Returns the new timeline and the report: ``source``, ``recovered_to`` and what was lost (see ``loss``).
    """
    lsn = point.last_record_lsn
    old = broken.state
    if old is not None:
        if old.system_id != point.system_id:
            raise Conflict(f"timeline {broken.timeline_id}: the pageserver's copy is of system {point.system_id}, "
                           f"the safekeeper's control file says {old.system_id}")
        if old.wal_seg_size != point.wal_seg_size:
            raise Conflict(f"timeline {broken.timeline_id}: WAL segment size {point.wal_seg_size} on the "
                           f"pageserver, {old.wal_seg_size} on the safekeeper")
        if lsn < old.timeline_start_lsn:
            raise Conflict(f"timeline {broken.timeline_id}: the pageserver's WAL ends at {format_lsn(lsn)}, before "
                           f"the timeline's start {format_lsn(old.timeline_start_lsn)}")
    state = TimelineState(
        timeline_id=broken.timeline_id, system_id=point.system_id, pg_version=point.pg_version,
        wal_seg_size=point.wal_seg_size,
        term=old.term if old else 0,
        term_history=[e for e in old.term_history if e.start_lsn <= lsn] if old else [],
        timeline_start_lsn=lsn, flush_lsn=lsn, commit_lsn=lsn,
        remote_consistent_lsn=min(old.remote_consistent_lsn, lsn) if old else 0,
        backup_lsn=min(old.backup_lsn, lsn) if old else 0)
    # The damaged WAL goes first: a crash before the new control file is written leaves the old one (or an
    # unreadable one) with no WAL, loaded as damaged again, never old WAL under a control file starting at L.
    wal_dir = broken.dir / "wal"
    if wal_dir.exists():
        shutil.rmtree(wal_dir)
    tl = SkTimeline.create(broken.dir, state)
    return tl, {"source": "pageserver", "recovered_to": format_lsn(lsn), **loss(broken, lsn)}
