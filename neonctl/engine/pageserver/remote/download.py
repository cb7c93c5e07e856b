"""Rebuilding a pageserver's timelines from remote storage when the local copy is gone or stale.

At start-up, before anything is served, every timeline the remote holds (it has a
``layers/index_part.json``, the remote commit point, and a ``metadata.json``) that
is missing locally - or whose local copy is *behind* the remote's, see below - is
downloaded whole into a staging directory and renamed into
``timelines/`` only when complete, so a crash mid-download leaves nothing half
there. The index and metadata are read first (they say what to fetch) and put in
place last. Every layer file is verified by opening it with the layer readers and
reading every value (summary, index and blob checksums) against the size the index
records; a damaged one stops the restore with an error naming it.

Stale local copies: the remote's metadata is always a copy of a metadata.json the
local disk had already made durable, so in normal operation the remote's
``last_record_lsn`` never exceeds the local one. When it does, the local disk went
back in time (an old backup put back, a disk that lost writes): uploading from it
would replace a newer remote index with an older one and delete the newer layers,
while the safekeepers have already dropped the WAL the remote held. Such a copy is
replaced by the remote one (downloaded and verified first, swapped in last).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from neonctl.engine.durability import fsync_dir
from neonctl.engine.lsn import WAL_SEGMENT_SIZE
from neonctl.engine.pageserver.commit_log import CommitLog, commits_of
from neonctl.engine.pageserver.key import KEY_SIZE
from neonctl.engine.pageserver.remote.storage import RemoteStorage
from neonctl.engine.pageserver.remote.upload import (
    INDEX_KEY,
    METADATA_KEY,
    remote_timelines,
    timeline_prefix,
)
from neonctl.engine.pageserver.storage_layer.delta_layer import DeltaLayerReader
from neonctl.engine.pageserver.storage_layer.image_layer import ImageLayerReader
from neonctl.engine.pageserver.storage_layer.layer_file import (
    IMAGE_MAGIC,
    LayerFileReader,
)
from neonctl.engine.pageserver.workdir import INDEX, list_timelines, timeline_dir
from neonctl.engine.wal.record_scan import scan_wal
from neonctl.engine.wal.segments import SegmentedWal
from neonctl.errors import CorruptData

log = logging.getLogger("pageserver.remote_restore")

STAGING = "restore.tmp"  # in the pageserver's workdir, next to timelines/ (same filesystem: rename is atomic)
_TIMELINE_ID = re.compile(r"[0-9a-f]{32}")
_SEGMENT = re.compile(r"[0-9A-F]{24}")


def restore_timelines(workdir: Path, storage: RemoteStorage) -> list[str]:
    """Download every complete remote timeline that is missing here or newer than here; return their ids."""
    staging = workdir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted restore starts over
    staging.mkdir(parents=True)
    local = set(list_timelines(workdir))
    restored = []
    for tid, files in sorted(remote_timelines(storage).items()):
        if not _TIMELINE_ID.fullmatch(tid):
            continue
        if INDEX_KEY not in files or METADATA_KEY not in files:
            if tid not in local:
                log.warning("remote timeline %s has no index_part.json or metadata.json (a deletion or its first"
                            " upload was interrupted): not restored", tid)
            continue
        if tid in local and not local_is_stale(workdir, storage, tid, staging):
            continue
        restore_timeline(storage, tid, files, workdir, staging)
        restored.append(tid)
    shutil.rmtree(staging, ignore_errors=True)
    return restored


def local_is_stale(workdir: Path, storage: RemoteStorage, tid: str, staging: Path) -> bool:
    """The remote holds WAL past the local copy's durable end: the local disk went back in time."""
    probe = staging / f"{tid}.probe.json"
    storage.download(timeline_prefix(tid) + METADATA_KEY, probe)
    try:
        remote_lsn = int(json.loads(probe.read_text())["last_record_lsn"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptData(f"remote timeline {tid}: bad metadata.json: {e}") from None
    finally:
        probe.unlink(missing_ok=True)
    local_lsn = int(json.loads((timeline_dir(workdir, tid) / "metadata.json").read_text())["last_record_lsn"])
    if remote_lsn <= local_lsn:
        return False
    log.warning("timeline %s: the local copy ends at %X, remote storage at %X - the local disk is stale;"
                " replacing it with the remote copy", tid, local_lsn, remote_lsn)
    return True


def restore_timeline(storage: RemoteStorage, tid: str, files: dict[str, int], workdir: Path, staging: Path) -> None:
    prefix = timeline_prefix(tid)
    tmp = staging / tid
    (tmp / "wal").mkdir(parents=True)
    (tmp / "layers").mkdir()
    log.info("restoring timeline %s from %s (%d files, %d bytes)", tid, storage.url, len(files), sum(files.values()))
    # the commit point and the metadata first, to a side name: they say what to fetch
    index_file, meta_file = staging / f"{tid}.{INDEX}", staging / f"{tid}.metadata.json"
    storage.download(prefix + INDEX_KEY, index_file)
    storage.download(prefix + METADATA_KEY, meta_file)
    try:
        index = json.loads(index_file.read_text())
        meta = json.loads(meta_file.read_text())
        layers = {d["name"]: d for d in index["layers"]}
        seg_size = int(meta.get("wal_seg_size", WAL_SEGMENT_SIZE))
        if meta["timeline_id"] != tid:
            raise ValueError(f"it names timeline {meta['timeline_id']}")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptData(f"remote timeline {tid}: bad index_part.json or metadata.json: {e}") from None
    for name, desc in sorted(layers.items()):
        key = f"layers/{name}"
        if key not in files:
            raise CorruptData(f"remote layer {prefix}{key} is listed in its index_part.json but missing")
        storage.download(prefix + key, tmp / "layers" / name)
        verify_layer(tmp / "layers" / name, desc, prefix + key)
    for key in sorted(files):
        if key.startswith("wal/") and _SEGMENT.fullmatch(key[len("wal/"):]):
            path = tmp / key
            storage.download(prefix + key, path)
            if path.stat().st_size < seg_size:  # the partial last segment was cut at last_record_lsn
                os.truncate(path, seg_size)
    rebuild_commit_log(tmp, meta, seg_size)
    os.rename(meta_file, tmp / "metadata.json")
    os.rename(index_file, tmp / "layers" / INDEX)
    _fsync_tree(tmp)
    timelines = workdir / "timelines"
    timelines.mkdir(parents=True, exist_ok=True)
    dest = timelines / tid
    if dest.exists():  # stale, or without metadata.json (no timeline: list_timelines skips it)
        old = staging / f"{tid}.replaced"
        os.rename(dest, old)
        os.rename(tmp, dest)
        fsync_dir(timelines)
        shutil.rmtree(old)
    else:
        os.rename(tmp, dest)
        fsync_dir(timelines)
    log.info("restored timeline %s up to %X (%d layers)", tid, meta["last_record_lsn"], len(layers))


def rebuild_commit_log(tmp: Path, meta: dict, seg_size: int) -> None:
    """Recreate commits.bin (not offloaded) by scanning the timeline's downloaded WAL for commit records.

    Scanning starts at the first segment held (a segment start: a record continued from an earlier,
    GC'd segment is skipped) and stops at last_record_lsn.
    """
    wal = SegmentedWal(tmp / "wal", seg_size)
    segments = wal.segments()
    commits = CommitLog(tmp / "commits.bin")
    if segments:
        pos, end, prev = max(segments[0] * seg_size, int(meta.get("start_lsn") or 0)), int(meta["last_record_lsn"]), None  # noqa: E501
        while pos < end:
            batch = scan_wal(wal.read(pos, min(16 << 20, end - pos)), pos, seg_size, prev_lsn=prev)
            if not len(batch):
                break  # damaged or torn WAL: commits beyond it stay unknown, like the WAL itself
            commits.append(commits_of(batch))
            pos, prev = batch.end_lsn, int(batch.lsn[-1])
    commits.close()
    wal.close()
    (tmp / "commits.bin").touch()


def verify_layer(path: Path, desc: dict, key: str) -> None:
    """Open a downloaded layer with its reader and read every value: any damage raises CorruptData naming it."""
    size = path.stat().st_size
    if size != desc["file_size"]:
        raise CorruptData(f"remote layer {key} is damaged: {size} bytes, its index says {desc['file_size']}")
    try:
        if desc["kind"] == "delta":
            with DeltaLayerReader(path) as r:
                named = str(r.name)
                r.read_all()
        else:
            with ImageLayerReader(path) as r:
                named = str(r.name)
            with LayerFileReader(path, IMAGE_MAGIC, "image", KEY_SIZE) as f:
                f.read_all()
    except CorruptData as e:
        raise CorruptData(f"remote layer {key} is damaged: {e.message}") from None
    except (ValueError, IndexError, OverflowError) as e:  # garbage that got past a check
        raise CorruptData(f"remote layer {key} is damaged: {e}") from None
    if named != path.name:
        raise CorruptData(f"remote layer {key} is damaged: its summary names layer {named}")


def _fsync_tree(root: Path) -> None:
    """The renamed-in names (metadata, index) and the directories: files were fsynced as they were downloaded."""
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))
    fsync_dir(root / "metadata.json")
    fsync_dir(root / "layers" / INDEX)
