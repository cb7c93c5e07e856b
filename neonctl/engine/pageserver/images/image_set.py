"""The image format: a data directory as a set of image layer files, addressed with Neon's keys.

An *image* is a whole data directory at one LSN, stored the way the pageserver stores pages: as
values under 18-byte keys in image layer files (``image_layer.py``), split into contiguous key
ranges of ~64 MiB of uncompressed values. Together the layers of one image cover the entire key
space [MIN_KEY, MAX_KEY), so a key absent from them did not exist at that LSN.

Which file goes where (spc 1663 = ``base/``, spc 1664 = ``global/`` with db 0):

==============================================  ============================================
file                                            key(s) and value
==============================================  ============================================
``base/<db>/<rel>[_fsm|_vm|_init][.N]``,        ``rel_block_key(spc, db, rel, fork, blk)``: the 8 KiB page,
``global/<rel>…``                               blk = N * RELSEG_SIZE + page in segment N;
                                                ``rel_size_key(spc, db, rel, fork)``: nblocks, u32 LE -
                                                for every fork, including empty ones
``base/<db>/pg_filenode.map``,                  ``relmap_key(spc, db)``: the file (512 bytes)
``global/pg_filenode.map``
``pg_xact/XXXX``                                ``slru_block_key(CLOG, segno, page)`` + ``slru_seg_size_key``
``pg_multixact/members/XXXX``                   same, kind MULTIXACT_MEMBERS
``pg_multixact/offsets/XXXX``                   same, kind MULTIXACT_OFFSETS
``global/pg_control``                           ``controlfile_key()``: the file (8 KiB)
image metadata                                  ``checkpoint_key()``: JSON (LSNs, version, modes, ...)
everything else                                 ``AUX_FILES_KEY`` (03 0 0 0 0 2): an uncompressed tar of the
                                                directory skeleton (every directory, even empty,
                                                with its mode) and the remaining files (PG_VERSION,
                                                configs, pg_stat, pg_logical, pg_twophase,
                                                pg_commit_ts, ...); the layer zstd-compresses it
==============================================  ============================================

Deliberately not stored (Postgres recreates, resets or ignores them at a recovery start, and
pg_basebackup leaves them out too): the contents of ``pg_wal`` (its subdirectories are kept
empty; a materialiser puts the WAL in), ``pg_replslot``, ``pg_stat_tmp``, ``pg_subtrans``
(zeroed at startup), ``pg_dynshmem``, ``pg_notify``, ``pg_serial``, ``pg_snapshots``;
``postmaster.pid``/``.opts``, ``backup_label*``, ``tablespace_map*``, signal files,
``pg_internal.init`` (relcache init files, removed at recovery start), temporary relations
(``t<backend>_<rel>``) and ``pgsql_tmp`` directories and files; and every fork but ``_init`` of an *unlogged*
relation - recovery deletes those forks and copies the init fork over the main fork, so their
contents are never read (Neon keeps only the init fork as well). Symlinks (tablespaces in
``pg_tblspc``, a symlinked ``pg_wal``) are not followed or stored; ``pg_wal`` is restored as a
directory.

``image_create.py`` turns a stopped data directory into such layers, ``image_restore.py`` writes
them back out as a data directory (byte-for-byte the original minus the skipped files above);
this module holds what both must agree on: the keys, the file layout and ``ImageInfo``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from neonctl.engine.pageserver.key import (
    SINGLETON_PREFIX,
    Key,
    KeyRange,
    SlruKind,
    checkpoint_key,
)

AUX_FILES_KEY = Key(SINGLETON_PREFIX, 0, 0, 0, 0, 2)
IMAGE_META_KEY = checkpoint_key()
FORMAT = "neonctl-image-v1"

BLCKSZ = 8192
DEFAULTTABLESPACE_OID = 1663
GLOBALTABLESPACE_OID = 1664

FORKS = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}
FORK_SUFFIX = {v: k for k, v in FORKS.items()}
INIT_FORK = 3
SLRU_DIRS = {"pg_xact": SlruKind.CLOG, "pg_multixact/members": SlruKind.MULTIXACT_MEMBERS,
             "pg_multixact/offsets": SlruKind.MULTIXACT_OFFSETS}
SLRU_DIR_OF = {v: k for k, v in SLRU_DIRS.items()}


@dataclass(frozen=True)
class ImageLayerFile:
    name: str
    path: str
    file_size: int
    key_start: str
    key_end: str
    num_values: int

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(Key.parse(self.key_start), Key.parse(self.key_end))


@dataclass(frozen=True)
class ImageInfo:
    """The layer files of one image and what a materialiser needs to know about them."""

    timeline_id: str
    lsn: int  # I: pages are at or before I; usable for target LSNs X >= I
    checkpoint_lsn: int  # C: the checkpoint recovery must start from (in pg_control)
    redo_lsn: int  # R: its redo point - WAL from here on is needed
    pg_version: int
    cluster_state: str  # "shut down" or "shut down in recovery"
    layers: tuple[ImageLayerFile, ...]
    raw_bytes: int = 0  # uncompressed size of all values

    @property
    def paths(self) -> list[Path]:
        return [Path(layer.path) for layer in self.layers]

    @property
    def file_size(self) -> int:
        return sum(layer.file_size for layer in self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def key_ranges(self) -> list[KeyRange]:
        return [layer.key_range for layer in self.layers]

    def relocated(self, directory: str | os.PathLike[str]) -> ImageInfo:
        """The same image with its layer files looked up in ``directory`` (paths are stored absolute)."""
        layers = tuple(replace(layer, path=str(Path(directory) / layer.name)) for layer in self.layers)
        return replace(self, layers=layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageInfo:
        d = dict(d)
        d["layers"] = tuple(ImageLayerFile(**layer) for layer in d["layers"])
        return cls(**d)


__all__ = [
    "AUX_FILES_KEY",
    "BLCKSZ",
    "DEFAULTTABLESPACE_OID",
    "FORK_SUFFIX",
    "FORKS",
    "FORMAT",
    "GLOBALTABLESPACE_OID",
    "IMAGE_META_KEY",
    "INIT_FORK",
    "SLRU_DIR_OF",
    "SLRU_DIRS",
    "ImageInfo",
    "ImageLayerFile",
]
