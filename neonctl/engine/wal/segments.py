"""WAL kept as Postgres-style 16 MiB segment files in one directory per timeline.

Both the safekeeper and the pageserver store WAL this way: a byte at LSN L
lives in segment L // seg_size at offset L % seg_size, so a segment can be
handed to Postgres for replay as it is. Files are named like Postgres' own
(timeline 1) but live under a neonctl timeline id, because every branch shares
Postgres timeline 1 and the same LSNs.

One instance is shared by threads (the pageserver's receiver writes while a
materialisation reads), and it keeps at most 8 segment files open, closing the
oldest: every operation holds the instance's lock, or a reader could pread a
descriptor another thread just closed - or, once the number is reused, another file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from neonctl.engine.lsn import (
    WAL_SEGMENT_SIZE,
    parse_segment_file_name,
    segment_file_name,
)


class SegmentedWal:
    def __init__(self, directory: Path, seg_size: int = WAL_SEGMENT_SIZE):
        self.dir = directory
        self.seg_size = seg_size
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._dir_dirty = False  # a segment file was created or removed since the last flush
        self._lock = threading.RLock()

    def path(self, segno: int) -> Path:
        return self.dir / segment_file_name(segno, seg_size=self.seg_size)

    def segments(self) -> list[int]:
        out = []
        for p in self.dir.iterdir():
            if len(p.name) == 24 and all(c in "0123456789ABCDEF" for c in p.name):
                out.append(parse_segment_file_name(p.name, self.seg_size))
        return sorted(out)

    def _fd(self, segno: int, create: bool) -> int | None:
        fd = self._fds.get(segno)
        if fd is not None:
            return fd
        path = self.path(segno)
        if not path.exists():
            if not create:
                return None
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.truncate(self.seg_size)  # zero-filled; a reader stops at zeros
            os.rename(tmp, path)
            self._dir_dirty = True
        fd = os.open(path, os.O_RDWR)
        self._fds[segno] = fd
        if len(self._fds) > 8:
            old = min(k for k in self._fds if k != segno)
            if old in self._dirty:
                os.fdatasync(self._fds[old])
                self._dirty.discard(old)
            os.close(self._fds.pop(old))
        return fd

    def write(self, lsn: int, data: bytes | memoryview) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                segno, off = divmod(lsn, self.seg_size)
                n = min(len(view), self.seg_size - off)
                fd = self._fd(segno, create=True)
                os.pwrite(fd, view[:n], off)
                self._dirty.add(segno)
                view = view[n:]
                lsn += n

    def flush(self) -> None:
        """Make every write so far durable (fdatasync each dirty segment)."""
        with self._lock:
            for segno in sorted(self._dirty):
                fd = self._fds.get(segno)
                if fd is not None:
                    os.fdatasync(fd)
            if self._dir_dirty:  # new or removed segment files: make the directory entries durable too
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self._dir_dirty = False
            self._dirty.clear()

    def read_into(self, lsn: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at lsn; missing segments and bytes past a file's end read as zeros.

        For bulk readers that keep WAL in numpy buffers: those get transparent huge pages, where a
        fresh ``bytes`` of 16 MiB costs about as much in page faults as scanning it.
        """
        with self._lock:
            pos = 0
            while pos < len(out):
                segno, off = divmod(lsn + pos, self.seg_size)
                n = min(len(out) - pos, self.seg_size - off)
                fd = self._fd(segno, create=False)
                got = os.preadv(fd, [out[pos:pos + n]], off) if fd is not None else 0
                if got < n:
                    out[pos + got:pos + n] = bytes(n - got)
                pos += n

    def copy_to(self, lsn: int, length: int, dst_fd: int, dst_off: int) -> None:
        """Copy bytes [lsn, lsn+length) into the file dst_fd at dst_off inside the kernel (copy_file_range: no
        trip through Python's memory, which was most of writing a compute's pg_wal). Missing segments and
        bytes past a file's end are skipped: the caller's file must read as zeros there (a hole)."""
        with self._lock:
            pos = 0
            while pos < length:
                segno, off = divmod(lsn + pos, self.seg_size)
                n = min(length - pos, self.seg_size - off)
                fd = self._fd(segno, create=False)
                done = 0
                while fd is not None and done < n:
                    got = os.copy_file_range(fd, dst_fd, n - done, off + done, dst_off + pos + done)
                    if got == 0:
                        break  # the segment file ends here
                    done += got
                pos += n

    def read(self, lsn: int, length: int) -> bytes:
        """Bytes [lsn, lsn+length); missing segments read as zeros."""
        with self._lock:
            if length <= self.seg_size - lsn % self.seg_size:  # the common case: one segment, one copy
                segno, off = divmod(lsn, self.seg_size)
                fd = self._fd(segno, create=False)
                chunk = os.pread(fd, length, off) if fd is not None else b""
                return chunk if len(chunk) == length else chunk + bytes(length - len(chunk))
            out = bytearray(length)
            view = memoryview(out)
            pos = 0
            while pos < length:
                segno, off = divmod(lsn + pos, self.seg_size)
                n = min(length - pos, self.seg_size - off)
                fd = self._fd(segno, create=False)
                if fd is not None:
                    os.preadv(fd, [view[pos:pos + n]], off)  # a short read leaves the zeros in place
                pos += n
            view.release()
            return bytes(out)

    def truncate(self, lsn: int) -> None:
        """Forget WAL at and after lsn: zero the rest of its segment, delete later segments."""
        with self._lock:
            segno, off = divmod(lsn, self.seg_size)
            for s in self.segments():
                if s > segno:
                    fd = self._fds.pop(s, None)
                    if fd is not None:
                        os.close(fd)
                    self._dirty.discard(s)
                    self.path(s).unlink()
                    self._dir_dirty = True
            fd = self._fd(segno, create=False)
            if fd is not None and off < self.seg_size:
                os.pwrite(fd, bytes(self.seg_size - off), off)
                self._dirty.add(segno)
            self.flush()

    def remove_segment(self, segno: int) -> None:
        with self._lock:
            fd = self._fds.pop(segno, None)
            if fd is not None:
                os.close(fd)
            self._dirty.discard(segno)
            self.path(segno).unlink(missing_ok=True)

    def copy_segment_to(self, segno: int, dest: Path, upto_lsn: int | None = None) -> None:
        """Write segment segno to dest (a Postgres pg_wal file), zeroed after upto_lsn if given."""
        data = self.read(segno * self.seg_size, self.seg_size)
        if upto_lsn is not None and upto_lsn < (segno + 1) * self.seg_size:
            cut = max(0, upto_lsn - segno * self.seg_size)
            data = data[:cut] + bytes(self.seg_size - cut)
        with open(dest, "wb") as f:
            f.write(data)

    def close(self) -> None:
        with self._lock:
            self.flush()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
