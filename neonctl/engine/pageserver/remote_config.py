"""A project's choice of remote storage (`neonctl project set --remote-storage URL`).

The pageserver opens its remote storage at start-up, so the setting changes only
while the project's daemons are stopped, as `--safekeepers` does. The new storage
is checked first - URL well-formed, credentials file private, bucket or directory
reachable and writable - and only then written to ``pageserver.json``: a refused
change leaves everything as it was. A new, empty remote is filled on the
pageserver's next start; one that already holds timelines this pageserver lacks
is restored from.
"""

from __future__ import annotations

from neonctl.engine.pageserver.config import PageserverConfig
from neonctl.engine.pageserver.remote_storage import default_config, describe, open_remote_storage, parse_url
from neonctl.engine.project import Project
from neonctl.errors import Conflict


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
