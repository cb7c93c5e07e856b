"""Real WAL for the WAL reader/decoder tests, made by real PostgreSQL, checked against pg_waldump.

Loaded as a pytest plugin (``pytest_plugins = ["walgen"]``) so the session
fixtures run once however many modules use them. Each fixture initdb's a
cluster once per session, runs a short workload that touches every record
kind the decoder has helpers for, stops the server and hands back its WAL
as a ``WalSample``. The Postgres directories live under ``shared_dir`` (the
unprivileged Postgres user must reach them) and are removed at session end.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
from crc32c import crc32c

from neonctl.engine.compute.runtime import PgRuntime, resolve_runtime, shared_dir
from neonctl.engine.lsn import parse_lsn, segment_file_name
from neonctl.errors import PostgresError

DEBIAN_PG15 = "/usr/lib/postgresql/15/bin"


@dataclass
class DumpBlock:
    block_id: int
    spc: int
    db: int
    rel: int
    fork: str
    blkno: int
    fpi: bool
    apply: bool
    hole_offset: int | None = None
    hole_length: int | None = None
    method: str | None = None


@dataclass
class DumpRecord:
    """One record as pg_waldump -b prints it."""

    rmgr: str
    rec_len: int
    tot_len: int
    xid: int
    lsn: int
    prev: int
    desc: str
    blocks: list[DumpBlock] = field(default_factory=list)


_REC_RE = re.compile(
    r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), "
    r"prev ([0-9A-F]+/[0-9A-F]+), desc: (.*)$"
)
_BLK_RE = re.compile(r"^\s+blkref #(\d+): rel (\d+)/(\d+)/(\d+) fork (\w+) blk (\d+)(.*)$")
_HOLE_RE = re.compile(r"hole: offset: (\d+), length: (\d+)(?:, compression saved: \d+, method: (\w+))?")


def parse_waldump(text: str) -> list[DumpRecord]:
    out: list[DumpRecord] = []
    for line in text.splitlines():
        m = _REC_RE.match(line)
        if m:
            out.append(DumpRecord(
                rmgr=m.group(1), rec_len=int(m.group(2)), tot_len=int(m.group(3)), xid=int(m.group(4)),
                lsn=parse_lsn(m.group(5)), prev=parse_lsn(m.group(6)), desc=m.group(7),
            ))
            continue
        m = _BLK_RE.match(line)
        if m:
            rest = m.group(7)
            fpi = "FPW" in rest
            blk = DumpBlock(
                block_id=int(m.group(1)), spc=int(m.group(2)), db=int(m.group(3)), rel=int(m.group(4)),
                fork=m.group(5), blkno=int(m.group(6)), fpi=fpi, apply=fpi and "for WAL verification" not in rest,
            )
            h = _HOLE_RE.search(rest)
            if h:
                blk.hole_offset, blk.hole_length, blk.method = int(h.group(1)), int(h.group(2)), h.group(3)
            out[-1].blocks.append(blk)
    return out


@dataclass
class WalSample:
    """A stopped cluster's WAL: every record from ``start_lsn`` to ``end_lsn`` (the shutdown checkpoint's end)."""

    runtime: PgRuntime
    root: Path
    wal_dir: Path
    seg_size: int
    start_lsn: int
    end_lsn: int
    last_record_lsn: int
    notes: dict = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.runtime.version

    def segment_path(self, segno: int) -> Path:
        return self.wal_dir / segment_file_name(segno, 1, self.seg_size)

    def read(self, lsn: int, n: int) -> bytes:
        """Up to n bytes at lsn, across segment files; short at a missing segment."""
        out = bytearray()
        while n > 0:
            segno, off = divmod(lsn, self.seg_size)
            try:
                with open(self.segment_path(segno), "rb") as f:
                    f.seek(off)
                    chunk = f.read(min(n, self.seg_size - off))
            except FileNotFoundError:
                break
            if not chunk:
                break
            out += chunk
            lsn += len(chunk)
            n -= len(chunk)
        return bytes(out)

    @cached_property
    def stream(self) -> bytes:
        """The WAL bytes from the start of ``start_lsn``'s page to ``end_lsn``."""
        first = self.start_lsn - self.start_lsn % 8192
        return self.read(first, self.end_lsn - first)

    @property
    def stream_lsn(self) -> int:
        return self.start_lsn - self.start_lsn % 8192

    @cached_property
    def waldump(self) -> list[DumpRecord]:
        proc = self.runtime.run([
            self.runtime.bin("pg_waldump"), "-b", "-p", str(self.wal_dir),
            "-s", _fmt(self.start_lsn), "-e", _fmt(self.end_lsn),
        ])
        return parse_waldump(proc.stdout)


def _fmt(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class _Cluster:
    def __init__(self, rt: PgRuntime, root: Path, seg_mb: int):
        self.rt = rt
        self.root = root
        self.data = root / "data"
        self.seg_mb = seg_mb

    def initdb(self) -> None:
        self.rt.run([self.rt.bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                     "--no-sync", f"--wal-segsize={self.seg_mb}"])
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                "\nlisten_addresses = ''\n"
                f"unix_socket_directories = '{self.root}'\n"
                "port = 5432\nfsync = off\nsynchronous_commit = off\n"
                "max_wal_size = 4GB\nmin_wal_size = 64MB\nwal_keep_size = 4GB\n"
                "checkpoint_timeout = 1h\nmax_prepared_transactions = 4\n"
                "shared_buffers = 32MB\nautovacuum = off\nlog_min_messages = warning\n"
            )

    def pg_ctl(self, *args: str) -> None:
        self.rt.run([self.rt.bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", *args])

    def psql(self, sql: str, db: str = "postgres") -> str:
        path = self.root / f"q{uuid.uuid4().hex[:8]}.sql"
        path.write_text(sql)
        os.chmod(path, 0o644)
        try:
            return self.rt.run([self.rt.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
                                "-p", "5432", "-U", "postgres", "-d", db, "-f", str(path)]).stdout
        finally:
            path.unlink()

    def pgbench(self, *args: str) -> None:
        self.rt.run([self.rt.bin("pgbench"), "-h", str(self.root), "-p", "5432", "-U", "postgres", *args, "postgres"])


WORKLOAD = """
CHECKPOINT;
CREATE DATABASE db_wal_log;
CREATE DATABASE db_copy STRATEGY FILE_COPY;
CREATE TABLE t1 AS SELECT g AS id, repeat('x', 60) AS pad FROM generate_series(1, 2000) g;
TRUNCATE t1;
INSERT INTO t1 SELECT g, repeat('y', 60) FROM generate_series(1, 2000) g;
DELETE FROM t1 WHERE id > 200;
VACUUM t1;
DROP TABLE t1;
VACUUM FULL pgbench_branches;
VACUUM FULL pg_class;
SELECT pg_logical_emit_message(true, 'neonctl', repeat('m', 200000)) IS NOT NULL;
SELECT pg_logical_emit_message(false, 'neonctl', repeat('n', 9000)) IS NOT NULL;
BEGIN;
CREATE TABLE t2 (a int);
INSERT INTO t2 VALUES (1);
PREPARE TRANSACTION 'p1';
COMMIT PREPARED 'p1';
BEGIN;
INSERT INTO t2 VALUES (2);
PREPARE TRANSACTION 'p2';
ROLLBACK PREPARED 'p2';
BEGIN;
INSERT INTO t2 VALUES (3);
ROLLBACK;
SELECT pg_switch_wal() IS NOT NULL;
DROP DATABASE db_copy;
SET wal_compression = pglz;
CHECKPOINT;
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 40 = 0;
"""


def generate(rt: PgRuntime, seg_mb: int, extra_sql: str = "") -> WalSample:
    root = shared_dir("test-wal") / f"pg{rt.version}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root.mkdir(mode=0o700)
    rt.chown(root)
    cl = _Cluster(rt, root, seg_mb)
    try:
        cl.initdb()
        cl.pg_ctl("start")
        try:
            start = parse_lsn(cl.psql("SELECT pg_current_wal_insert_lsn();").strip())
            cl.pgbench("-i", "-s", "1", "-q")
            cl.pgbench("-n", "-t", "300", "-c", "2", "-j", "1")
            cl.psql(WORKLOAD + extra_sql)
            cl.pgbench("-n", "-t", "100", "-c", "1", "-N")
        finally:
            cl.pg_ctl("stop", "-m", "fast")
        ctl = rt.run([rt.bin("pg_controldata"), str(cl.data)]).stdout
        last = parse_lsn(re.search(r"Latest checkpoint location:\s+(\S+)", ctl).group(1))
        # The shutdown checkpoint's end: its record length is in the first 4 bytes (never split).
        sample = WalSample(rt, root, cl.data / "pg_wal", seg_mb << 20, start, 0, last)
        (tot_len,) = struct.unpack("<I", sample.read(last, 4))
        sample.end_lsn = last + ((tot_len + 7) & ~7)
        return sample
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _runtime(pg_bin: str | None) -> PgRuntime:
    try:
        return resolve_runtime(pg_bin)
    except PostgresError as e:
        pytest.fail(f"PostgreSQL not available: {e}")  # a required part of the test machine


@pytest.fixture(scope="session")
def wal_pg18():
    """PG 18 (embedded), 16 MiB segments."""
    sample = generate(_runtime(None), 16)
    yield sample
    shutil.rmtree(sample.root, ignore_errors=True)


@pytest.fixture(scope="session")
def wal_pg15():
    """Debian PG 15, 1 MiB segments (many segment crossings), zstd and lz4 page images too."""
    if not Path(DEBIAN_PG15, "postgres").exists():
        pytest.fail("Debian PostgreSQL 15 is required (apt-get install postgresql-15; .ci/run does)")
    extra = (
        "SET wal_compression = zstd; CHECKPOINT;\n"
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 45 = 0;\n"
        "SET wal_compression = lz4; CHECKPOINT;\n"
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 50 = 0;\n"
    )
    sample = generate(_runtime(DEBIAN_PG15), 1, extra)
    yield sample
    shutil.rmtree(sample.root, ignore_errors=True)


@pytest.fixture(scope="session", params=["pg18", "pg15"])
def wal_sample(request):
    return request.getfixturevalue(f"wal_{request.param}")


# -- synthetic WAL ------------------------------------------------------------


def make_record(rmid: int, info: int, main_data: bytes, xid: int = 0, prev: int = 0) -> bytes:
    """An XLogRecord with only main data, CRC filled in."""
    import struct


    body = (bytes([255, len(main_data)]) if len(main_data) < 256
            else bytes([254]) + struct.pack("<I", len(main_data))) + main_data
    hdr = struct.pack("<IIQBBxx", 24 + len(body), xid, prev, info, rmid)
    return hdr + struct.pack("<I", crc32c(hdr, crc32c(body))) + body


class WalWriter:
    """Lays records out into WAL pages the way PostgreSQL does, for tests that need odd WAL."""

    def __init__(self, start_lsn: int, seg_size: int = 16 << 20, magic: int = 0xD118, sysid: int = 7):
        assert start_lsn % 8192 == 0
        self.start_lsn = start_lsn
        self.pos = start_lsn
        self.seg_size = seg_size
        self.magic = magic
        self.sysid = sysid
        self.buf = bytearray()
        self.prev = 0
        self.next_page_flags = 0
        self.lsns: list[int] = []
        self.ends: list[int] = []

    def _page_header(self, rem_len: int) -> None:
        info = self.next_page_flags
        self.next_page_flags = 0
        if rem_len:
            info |= 0x0001
        if self.pos % self.seg_size == 0:
            info |= 0x0002
            hdr = struct.pack("<HHIQI4xQII", self.magic, info, 1, self.pos, rem_len, self.sysid, self.seg_size, 8192)
        else:
            hdr = struct.pack("<HHIQI4x", self.magic, info, 1, self.pos, rem_len)
        self._put(hdr)

    def _put(self, b: bytes) -> None:
        self.buf += b
        self.pos += len(b)

    def append(self, rmid: int, info: int, main_data: bytes, xid: int = 0, limit: int | None = None) -> int:
        """Write a record (only its first `limit` bytes if given: a torn record); return its LSN."""
        if self.pos % 8192 == 0:
            self._page_header(0)
        rec = make_record(rmid, info, main_data, xid, self.prev)
        lsn = self.pos
        data = rec if limit is None else rec[:limit]
        done = 0
        while done < len(data):
            if self.pos % 8192 == 0:
                self._page_header(len(rec) - done)
            room = 8192 - self.pos % 8192
            chunk = data[done:done + room]
            self._put(chunk)
            done += len(chunk)
        if limit is None:
            self._put(bytes(-self.pos % 8))
            self.prev = lsn
            self.lsns.append(lsn)
            self.ends.append(self.pos)
        return lsn

    def pad_to_page(self) -> None:
        self._put(bytes(-self.pos % 8192))

    def data(self) -> bytes:
        return bytes(self.buf)


@pytest.fixture(name="WalWriter")
def wal_writer_class():
    """The WalWriter class (test modules get it as a fixture: importing walgen would defeat its plugin loading)."""
    return WalWriter
