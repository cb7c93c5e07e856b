"""Project lifecycle: create (initdb, import as the root timeline's first image) and delete.

Separate from `engine/project.py` (the model everyone imports) because both
operations reach across components: create writes the pageserver's and the
safekeepers' first state, delete stops endpoints and daemons first. Keeping them
here is what lets the model stay free of import cycles and of the heavy
pageserver modules. `create_project` either completes or leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

from neonctl.engine import ports
from neonctl.engine.compute import dir_pool
from neonctl.engine.compute.endpoint import (
    directory_pool,
    endpoint_status,
    read_state,
    start_endpoint,
    stop_all_endpoints,
)
from neonctl.engine.compute.runtime import resolve_runtime
from neonctl.engine.connection import proxy_uri
from neonctl.engine.credentials import ensure_token
from neonctl.engine.durability import fsync_dir
from neonctl.engine.failpoints import failpoint
from neonctl.engine.home import compute_root, projects_dir, tighten_home
from neonctl.engine.pageserver.timeline.timeline import Timeline, timeline_dir
from neonctl.engine.project import (
    BROKER_BASE_PORT,
    DEFAULT_BRANCH,
    PAGESERVER_BASE_PORT,
    SAFEKEEPER_BASE_PORT,
    Branch,
    Project,
    ProjectConfig,
    allocate_proxy_ports,
    check_name,
    current_marker,
    list_projects,
    load_project,
    taken_ports,
)
from neonctl.engine.remote_settings import delete_remote_data, prepare_remote_storage, set_remote_storage
from neonctl.engine.roles import load_roles
from neonctl.engine.safekeeper.control_file import TimelineState
from neonctl.engine.safekeeper.membership import set_safekeeper_count
from neonctl.engine.safekeeper.timeline import SkTimeline
from neonctl.engine.storage import start_storage, stop_storage
from neonctl.errors import AlreadyExists, InvalidInput, NotFound


def create_project(name: str, pg_bin: str | None = None, safekeepers: int = 1, progress=print) -> Project:
    check_name("project", name)
    if safekeepers < 1 or safekeepers > 7:
        raise InvalidInput("--safekeepers must be between 1 and 7")
    pdir = projects_dir() / name
    if (pdir / "project.json").exists():
        raise AlreadyExists(
            f"project {name!r} already exists", hint="choose another --name or `neonctl project delete`"
        )
    runtime = resolve_runtime(pg_bin)  # fails before anything is created
    taken = taken_ports()
    (ps_port,) = ports.allocate(PAGESERVER_BASE_PORT, taken)
    (broker_port,) = ports.allocate(BROKER_BASE_PORT, taken | {ps_port})
    sk_ports = ports.allocate(SAFEKEEPER_BASE_PORT, taken | {ps_port, broker_port}, safekeepers)
    proxy_port, proxy_http_port, proxy_ws_port = allocate_proxy_ports(taken | {ps_port, broker_port, *sk_ports})
    if pdir.exists():
        shutil.rmtree(pdir)  # leftovers of an interrupted init, never a complete project
    remove_deleted_projects()
    pdir.mkdir(parents=True)
    try:
        timeline_id = uuid.uuid4().hex
        progress(f"initdb with PostgreSQL {runtime.version_string} ...")
        with tempfile.TemporaryDirectory(dir=compute_root(pdir)) as tmp:
            os.chmod(tmp, 0o755)
            pgdata = Path(tmp) / "pgdata"
            pgdata.mkdir(mode=0o700)
            runtime.chown(pgdata)
            runtime.run(
                [
                    runtime.bin("initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                ]
            )
            progress("importing the initdb image into the pageserver ...")
            tl = Timeline.import_initdb(
                timeline_dir(pdir / "pageserver", timeline_id), timeline_id, pgdata, runtime.bin_dir, runtime.version
            )
        sk_cfg = []
        for i, port in enumerate(sk_ports, start=1):
            sk_cfg.append({"id": i, "port": port})
            state = TimelineState(
                timeline_id=timeline_id,
                system_id=tl.meta.system_id,
                pg_version=runtime.version,
                timeline_start_lsn=tl.last_record_lsn,
                flush_lsn=tl.last_record_lsn,
                commit_lsn=tl.last_record_lsn,
            )
            SkTimeline.create(pdir / "safekeepers" / f"sk{i}" / "timelines" / timeline_id, state)
        config = ProjectConfig(
            name=name,
            id=uuid.uuid4().hex,
            pg_bin=str(pg_bin) if pg_bin else None,
            pg_version=runtime.version,
            system_id=tl.meta.system_id,
            pageserver_port=ps_port,
            broker_port=broker_port,
            safekeepers=sk_cfg,
            branches={DEFAULT_BRANCH: Branch(DEFAULT_BRANCH, timeline_id)},
            proxy_port=proxy_port,
            proxy_http_port=proxy_http_port,
            proxy_ws_port=proxy_ws_port,
        )
        ensure_token(pdir)  # the daemons' API credential, before anything can start them
        tmp_json = pdir / "project.json.tmp"
        tmp_json.write_text(json.dumps(asdict(config), indent=1))
        os.replace(tmp_json, pdir / "project.json")  # the commit point of init
    except BaseException:
        croot = compute_root(pdir)
        if croot != pdir / "compute":
            shutil.rmtree(croot, ignore_errors=True)
        shutil.rmtree(pdir, ignore_errors=True)
        raise
    current_marker().write_text(name)
    tighten_home()
    project = Project(pdir)
    load_roles(project)  # the `postgres` role's password, in the project's 0600 secrets
    return project


def delete_project(project: Project, keep_remote: bool = False) -> dict | None:
    """Stop everything and delete the project; its timelines in remote storage first, unless keep_remote.

    A remote that cannot be reached fails the deletion before any local file is gone (the daemons are
    stopped by then); returns what was deleted remotely.
    """
    stop_all_endpoints(project)
    stop_storage(project, immediate=True)
    failpoint("project-delete-after-daemons")
    remote = None if keep_remote else delete_remote_data(project)
    croot = project.compute_root()
    if croot != project.dir / "compute":
        shutil.rmtree(croot, ignore_errors=True)
    # One rename takes the project out of every listing, so a delete killed during the removal never
    # leaves a half-deleted project (a project.json whose files are partly gone); the next delete or
    # `init` removes what is left.
    grave = project.dir.with_name(f".deleted-{project.dir.name}-{secrets.token_hex(4)}")
    os.rename(project.dir, grave)
    fsync_dir(grave.parent)
    failpoint("project-delete-after-rename")
    remove_deleted_projects()
    try:
        if current_marker().read_text().strip() == project.name:
            current_marker().unlink()
    except OSError:
        pass
    return remote


def remove_deleted_projects(name: str | None = None) -> bool:
    """Finish the removals of deleted projects (all, or `name`'s) that a crash interrupted after their
    rename; whether there was one."""
    pattern = re.compile(rf"\.deleted-{re.escape(name) if name else '.+'}-[0-9a-f]{{8}}")
    found = False
    for d in projects_dir().glob(".deleted-*"):
        if pattern.fullmatch(d.name):
            shutil.rmtree(d, ignore_errors=True)
            found = True
    return found


def project_to_delete(name: str) -> Project | None:
    """The project `project delete NAME` deletes, or None when only an interrupted deletion of it was left
    (finished here: a retry of a killed delete succeeds)."""
    try:
        return load_project(name)
    except NotFound:
        if remove_deleted_projects(name):
            return None
        raise


QUICKSTART_PROJECT = "demo"


def configure_project(project: Project, *, remote_storage: str | None = None, s3_endpoint_url: str | None = None,
                      s3_region: str | None = None, s3_credentials_file: str | None = None,
                      safekeepers: int | None = None, suspend_timeout: int | None = None,
                      pool_size: int | None = None, pool_max_mb: int | None = None,
                      progress=print) -> Project:
    """`neonctl project set`: every setting is checked before any changes, then applied in an order a
    failure leaves consistent (membership first: it may refuse with the daemons running)."""
    if remote_storage is None and any(v is not None for v in (s3_endpoint_url, s3_region, s3_credentials_file)):
        raise InvalidInput("the --s3-* options go with --remote-storage s3://BUCKET/PREFIX")
    if suspend_timeout is not None and suspend_timeout < 0:
        raise InvalidInput("--suspend-timeout must be >= 0 seconds (0 = never suspend)")
    if pool_size is not None and not 0 <= pool_size <= 32:
        raise InvalidInput("--pool-size must be between 0 (keep no stopped directory) and 32")
    if pool_max_mb is not None and pool_max_mb < 0:
        raise InvalidInput("--pool-max-mb must be >= 0")
    remote = None
    if remote_storage is not None:
        remote = prepare_remote_storage(project, remote_storage, s3_endpoint_url, s3_region, s3_credentials_file)
    if safekeepers is not None:
        set_safekeeper_count(project, safekeepers, progress=progress)
    if remote is not None:
        set_remote_storage(project, remote)
    if suspend_timeout is not None:
        project.set_suspend_timeout(suspend_timeout)
    if pool_size is not None or pool_max_mb is not None:
        project.set_pool_bounds(pool_size, pool_max_mb)
        # the pageserver's refill reads the bounds from the pool itself (pageserver/pool_refill.py)
        dir_pool.write_limits(directory_pool(project), project.config.pool_size, project.config.pool_max_mb << 20)
    project.reload()
    return project


def quickstart(progress=print) -> dict:
    """From nothing to a running `main`: init a demo project if there is none, start storage and `main`,
    then prove it with a write and a read. Safe to run again: each step is skipped when already done."""
    import psycopg  # noqa: PLC0415 - only this operation talks SQL; keeps psycopg off the CLI's start-up

    if not list_projects():
        progress(f"creating project {QUICKSTART_PROJECT!r} ...")
        project = create_project(QUICKSTART_PROJECT, progress=progress)
    else:
        project = load_project(None)
    start_storage(project, progress=progress)
    st = read_state(project, DEFAULT_BRANCH)
    if st is None or endpoint_status(st) != "running":
        st = start_endpoint(project, DEFAULT_BRANCH, progress=progress)
    with psycopg.connect(st.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS quickstart (id serial PRIMARY KEY, note text, at timestamptz DEFAULT now())"
        )
        conn.execute("INSERT INTO quickstart (note) VALUES ('hello from neonctl')")
        (rows,) = conn.execute("SELECT count(*) FROM quickstart").fetchone()
        (version,) = conn.execute("SHOW server_version").fetchone()
        (lsn,) = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    return {
        "project": project.name,
        "branch": DEFAULT_BRANCH,
        "postgres": version,
        "rows_in_quickstart_table": rows,
        "wal_lsn": lsn,
        "start_lsn": st.start_lsn,
        "connection_string": proxy_uri(project),
    }
