"""GetPage@LSN: the 8 KiB image of one relation page at an LSN, as Postgres would read it there.

The layers answer directly when the newest version of the page at or below the LSN is an
image-layer value: images are copies of files the redo worker flushed, and no WAL touched the
page between the image and the LSN. Anything else - WAL records on top of an image, or a
full-page image (Postgres stamps the record's LSN and a fresh checksum on it when it applies
it) - is replayed by Postgres itself: the timeline is materialised at the LSN in scratch space
and Postgres crash-recovers it in single-user mode (no port, autovacuum off, nothing run), which
ends with a checkpoint that writes every replayed page; the page is then read from its segment
file. (The standby-mode redo worker does not do here: when no checkpoint record was replayed,
its shutdown skips the restartpoint and leaves the replayed pages unwritten.) That costs a
materialisation of the whole database, which is what vanilla Postgres allows; ``neonctl page
get`` is a debugging tool.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.lsn import format_lsn
from neonctl.engine.pageserver import value
from neonctl.engine.pageserver.images.create import RELSEG_SIZE
from neonctl.engine.pageserver.images.image_set import BLCKSZ
from neonctl.engine.pageserver.images.restore import rel_path
from neonctl.engine.pageserver.key import Key
from neonctl.errors import Conflict, InvalidInput, PostgresError


@dataclass
class PageAt:
    lsn: int  # the record end the page is read at (at or before the LSN asked for)
    page: bytes | None  # None: the block does not exist there (relation absent or shorter)
    source: str  # "image layer", "postgres redo" or "none"
    versions_replayed: int = 0


def relation_file(pgdata: Path, key: Key) -> tuple[Path, int]:
    """The segment file holding a relation block and the block's byte offset in it."""
    segno, blk = divmod(key.field6, RELSEG_SIZE)
    return pgdata / rel_path(*key.rel_tag(), segno), blk * BLCKSZ


def page_at(tl, key: Key, lsn: int, runtime, scratch: Path | None) -> PageAt:
    """The page of a relation block at the last record end at or before lsn."""
    if not key.is_rel_block():
        raise InvalidInput(f"{key} is not a relation block")
    at = tl.record_end_at_or_before(lsn)
    versions, _ = tl.get_page_versions(key, at)
    if not versions:
        return PageAt(at, None, "none")
    newest_kind = versions[0][2][0]
    if newest_kind == value.IMAGE:
        return PageAt(at, value.page_image(versions[0][2]), "image layer")
    if runtime is None or scratch is None:
        raise Conflict("the page needs WAL redo, and the pageserver was started without Postgres binaries")
    work = Path(tempfile.mkdtemp(dir=scratch, prefix="getpage-"))
    os.chmod(work, 0o755)
    try:
        pgdata = work / "pgdata"
        tl.materialize(at, pgdata)
        runtime.chown(work, recursive=True)
        runtime.run([str(runtime.bin("postgres")), "--single", "-D", str(pgdata), "-c", "autovacuum=off",
                     "-c", "fsync=off", "postgres"], input="", timeout=600)
        cd = read_control_data(runtime.bin_dir, pgdata)
        if cd.state != "shut down" or cd.checkpoint_lsn < at:
            raise PostgresError(f"single-user recovery ended at {format_lsn(cd.checkpoint_lsn)} ({cd.state}),"
                                f" before {format_lsn(at)}: the page would be stale")
        path, offset = relation_file(pgdata, key)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                page = f.read(BLCKSZ)
        except FileNotFoundError:
            page = b""
        n = next((i + 1 for i, v in enumerate(versions) if v[1] or v[2][0] == value.IMAGE), len(versions))
        return PageAt(at, page if len(page) == BLCKSZ else None, "postgres redo", n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
