"""The safekeeper as a physical-replication client (a synchronous standby) of the compute.

IDENTIFY_SYSTEM checks the compute belongs to this timeline's cluster; ``SHOW
neonctl.term`` checks it was started by the election of our current term (a
compute of an older term is fenced off: we never stream from it, so it can
never again reach a quorum); a physical slot keeps the compute's WAL while we
are away; START_REPLICATION opens CopyBoth. Each socket read is a batch:
append every XLogData, one fdatasync, then report write = flush = apply, so
the compute's synchronous_commit wait ends only once the WAL is durable here.
"""

from __future__ import annotations

import asyncio
import logging

from neonctl.engine import pgwire
from neonctl.engine.lsn import format_lsn
from neonctl.engine.safekeeper.timeline import SkTimeline
from neonctl.errors import InvalidInput

log = logging.getLogger("safekeeper.receiver")


class ReplicationConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.buf = pgwire.MessageBuffer()

    async def next_message(self) -> tuple[bytes, bytes]:
        while (msg := self.buf.next_message()) is None:
            data = await self.reader.read(1 << 20)
            if not data:
                raise ConnectionError("compute closed the replication connection")
            self.buf.feed(data)
        if msg[0] == b"E":
            raise pgwire.ServerError(pgwire.parse_error_fields(msg[1]))
        return msg

    async def simple_query(self, sql: str) -> list[list[str | None]]:
        self.writer.write(pgwire.query(sql))
        rows, error = [], None
        while True:
            try:
                kind, body = await self.next_message()
            except pgwire.ServerError as e:
                error = e
                continue
            if kind == b"D":
                rows.append(pgwire.parse_data_row(body))
            elif kind == b"Z":
                if error:
                    raise error
                return rows


async def connect(host: str, port: int, user: str, app_name: str) -> ReplicationConnection:
    if host.startswith("/"):  # the compute's Unix socket directory
        reader, writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    else:
        reader, writer = await asyncio.open_connection(host, port)
    conn = ReplicationConnection(reader, writer)
    writer.write(pgwire.startup_message(
        {"user": user, "replication": "true", "application_name": app_name}))
    while True:
        kind, body = await conn.next_message()
        if kind == b"R":
            code = int.from_bytes(body[:4], "big")
            if code != 0:
                raise ConnectionError(f"compute asks for authentication method {code}; neonctl computes use trust")
        elif kind == b"Z":
            return conn


class Fenced(Exception):
    """The compute and this safekeeper are not in the same term: do not stream."""


async def compute_term(conn: ReplicationConnection) -> int | None:
    """The election term the compute was started in (`neonctl.term` in its postgresql.conf)."""
    try:
        rows = await conn.simple_query("SHOW neonctl.term")
    except pgwire.ServerError as e:
        if e.sqlstate == "42704":  # undefined_object: a compute neonctl did not start
            return None
        raise
    try:
        return int(rows[0][0])
    except (IndexError, TypeError, ValueError):
        return None


def check_term(tl: SkTimeline, term: int | None) -> None:
    """Stream only from the compute of our own term, and only once we hold WAL up to its start."""
    if term is None:
        raise Fenced("the compute has no neonctl.term setting; only computes started by an election stream")
    if term != tl.term or not tl.in_term:
        raise Fenced(f"the compute is of term {term}; this safekeeper is at term {tl.term}"
                     f"{'' if tl.in_term else ' (not yet joined)'}")
    if tl.flush_lsn < tl.term_start_lsn:
        raise Fenced(f"WAL ends at {format_lsn(tl.flush_lsn)}, below the start of term {term} at "
                     f"{format_lsn(tl.term_start_lsn)}: catching up from peers first")


async def stream(tl: SkTimeline, app_name: str, stop: asyncio.Event, on_flushed) -> None:
    """Stream WAL from the timeline's compute until stopped, fenced, or the connection breaks."""
    c = tl.compute
    conn = await connect(c["host"], int(c["port"]), c.get("user", "postgres"), app_name)
    try:
        rows = await conn.simple_query("IDENTIFY_SYSTEM")
        if int(rows[0][0]) != tl.system_id:
            raise InvalidInput(f"compute at {c['host']}:{c['port']} has system id {rows[0][0]},"
                               f" timeline expects {tl.system_id}")
        term = await compute_term(conn)
        check_term(tl, term)
        slot = f"neonctl_{app_name}"
        try:
            await conn.simple_query(f"CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")
        except pgwire.ServerError as e:
            if e.sqlstate != "42710":  # duplicate_object: the slot survives compute restarts
                raise
        async with tl.append_lock:  # peer recovery and we never write at the same time
            check_term(tl, term)
            conn.writer.write(pgwire.query(
                f"START_REPLICATION SLOT {slot} PHYSICAL {format_lsn(tl.write_lsn)} TIMELINE 1"))
            while True:
                kind, _ = await conn.next_message()
                if kind == b"W":
                    break
            # Report what we hold right away: WAL recovered from a peer while we were away may already cover
            # commits waiting for a quorum, and the walsender has nothing new to send us (without this reply
            # they waited for the next WAL, up to ~15 s: Postgres logs running xacts every 15 s when idle).
            end = tl.synced_lsn
            conn.writer.write(pgwire.standby_status_update(end, end, end))
            tl.streaming = True
            tl.last_error = None
            log.info("streaming %s from %s:%s at %s in term %d", tl.timeline_id, c["host"], c["port"],
                     format_lsn(tl.write_lsn), term)
            await _copy_both(tl, conn, stop, term, on_flushed)
    finally:
        tl.streaming = False
        conn.writer.close()


async def _copy_both(tl: SkTimeline, conn: ReplicationConnection, stop: asyncio.Event, term: int,
                     on_flushed) -> None:
    """The hot path: one batch per socket read, one fdatasync per batch, then the reply.

    The fdatasync runs on the event loop thread: a batch is only acknowledged after it anyway, a
    worker-thread hand-off costs more CPU than it saves, and WAL arriving meanwhile simply makes
    the next batch bigger (group commit). Without WAL the read just waits: the walsender asks for
    a reply (keepalive) when it wants one.
    """
    reader, buf, writer = conn.reader, conn.buf, conn.writer
    while not stop.is_set():
        if tl.term != term:
            raise Fenced(f"safekeeper moved to term {tl.term}; the compute of term {term} is fenced off")
        reply_wanted = False
        wrote = False
        if not buf.has_message():
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("compute closed the replication connection")
            buf.feed(data)
        pieces: list[bytes] = []  # contiguous XLogData of this batch, written with one pwrite
        first = expected = 0
        while (msg := buf.next_message()) is not None:
            kind, body = msg
            if kind == b"d":
                if body[:1] == b"w":
                    if len(body) > 25:
                        lsn = int.from_bytes(body[1:9], "big")
                        if pieces and lsn != expected:
                            tl.append(first, b"".join(pieces))
                            pieces = []
                        if not pieces:
                            first = lsn
                        pieces.append(body[25:])
                        expected = lsn + len(body) - 25
                else:
                    payload = pgwire.parse_copy_payload(body)
                    if isinstance(payload, pgwire.Keepalive) and payload.reply_requested:
                        reply_wanted = True
            elif kind == b"E":
                raise pgwire.ServerError(pgwire.parse_error_fields(body))
            elif kind == b"c":
                return
        if pieces:
            tl.append(first, pieces[0] if len(pieces) == 1 else b"".join(pieces))
            wrote = True
        if wrote:
            tl.sync()
            tl.mark_synced(tl.write_lsn, tl.record_lsn)
            on_flushed(tl)
        if wrote or reply_wanted:
            end = tl.synced_lsn
            writer.write(pgwire.standby_status_update(end, end, end))
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()


async def run_receiver(tl: SkTimeline, app_name: str, stop: asyncio.Event, on_flushed=lambda tl: None) -> None:
    """Keep streaming from the configured compute, reconnecting after failures, until stopped."""
    last_logged = None
    while not stop.is_set():
        delay = 0.3
        try:
            await stream(tl, app_name, stop, on_flushed)
        except Fenced as e:
            tl.last_error = str(e)
            delay = 0.5
            if str(e) != last_logged:
                log.info("receiver for %s: %s", tl.timeline_id, e)
                last_logged = str(e)
        except (OSError, ConnectionError, pgwire.ServerError, InvalidInput, asyncio.IncompleteReadError) as e:
            tl.last_error = str(e)
            if str(e) != last_logged:
                log.info("receiver for %s: %s", tl.timeline_id, e)
                last_logged = str(e)
            delay = 1.0
        except Exception as e:
            tl.last_error = f"{type(e).__name__}: {e}"
            log.exception("receiver for %s failed", tl.timeline_id)
            delay = 1.0
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
