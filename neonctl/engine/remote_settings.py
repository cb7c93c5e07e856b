"""A project's choice of remote storage (`neonctl project set --remote-storage URL`).

The pageserver opens its remote storage at start-up, so the setting changes only
while the project's daemons are stopped, as `--safekeepers` does. The new storage
is checked first - URL well-formed, credentials file private, bucket or directory
reachable and writable - and only then written to ``pageserver.json``: a refused
change leaves everything as it was. A new, empty remote is filled on the
pageserver's next start; one that already holds timelines this pageserver lacks
is restored from.

Deleting a project deletes its timelines from the remote too (unless asked to keep
them): only the timelines this project owns, so two projects sharing a bucket
prefix never delete each other's.
"""

from __future__ import annotations

from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.remote.storage import (
    default_config,
    describe,
    open_remote_storage,
    parse_url,
)
from neonctl.engine.pageserver.remote.upload import (
    delete_remote_timeline,
    remote_timelines,
)
from neonctl.engine.pageserver.workdir import list_timelines
from neonctl.engine.project import Project
from neonctl.errors import Conflict, RemoteStorageError


def remote_storage_config(project: Project) -> dict:
    return PageserverConfig.load(project.dir / "pageserver").remote_storage or default_config(project.dir)


def remote_storage_url(project: Project) -> str:
    return describe(remote_storage_config(project))


def _require_stopped(project: Project) -> None:
    running = [d.name for d in project.daemons() if d.pid() is not None]
    if running:
        raise Conflict(f"stop the project's daemons first ({', '.join(running)} running)", hint="neonctl stop")


def prepare_remote_storage(project: Project, url: str, endpoint_url: str | None = None, region: str | None = None,
                           credentials_file: str | None = None) -> dict:
    """Parse and check a new setting without writing it (so a command changing several things can fail first)."""
    cfg = parse_url(url, endpoint_url, region, credentials_file)
    _require_stopped(project)
    open_remote_storage(cfg, project.dir).check()
    return cfg


def set_remote_storage(project: Project, cfg: dict) -> dict:
    """Write a setting prepare_remote_storage accepted."""
    with project.lock():
        project.reload()
        _require_stopped(project)
        workdir = project.dir / "pageserver"
        ps = PageserverConfig.load(workdir)
        before = ps.remote_storage or default_config(project.dir)
        ps.remote_storage = None if cfg == default_config(project.dir) else cfg
        ps.save(workdir)
    return {"remote_storage": describe(cfg), "changed": cfg != before}


def delete_remote_data(project: Project) -> dict:
    """Delete the project's own timelines from its remote storage (the daemons must be stopped)."""
    _require_stopped(project)
    cfg = remote_storage_config(project)
    storage = open_remote_storage(cfg, project.dir)
    own = set(list_timelines(project.dir / "pageserver")) | {b.timeline_id for b in project.config.branches.values()}
    try:
        present = sorted(own & set(remote_timelines(storage)))
        objects = sum(delete_remote_timeline(storage, tid) for tid in present)
    except RemoteStorageError as e:
        raise RemoteStorageError(f"cannot delete the project's timelines from {describe(cfg)}: {e.message}",
                                 hint="fix access, or delete with --keep-remote to leave them there") from None
    return {"remote_storage": describe(cfg), "timelines": len(present), "objects": objects}
