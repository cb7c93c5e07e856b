"""Starting, stopping and inspecting a project's daemons (storage and the proxy) as a unit."""

from __future__ import annotations

from neonctl.engine import client
from neonctl.engine.credentials import ensure_token, register_project
from neonctl.engine.project import Project
from neonctl.errors import DaemonError


def start_storage(project: Project, progress=lambda msg: None) -> list[dict]:
    """Start broker, safekeepers, pageserver and proxy; already-running ones are left alone, except a proxy an
    older neonctl started without the WebSocket port: it is restarted (its computes keep running)."""
    if project.config.proxy_ws_port is None:
        project.assign_proxy_ports()
    if project.proxy_without_ws():
        progress(f"restarting the proxy to open its WebSocket port {project.proxy_ws_addr}")
        project.daemon("proxy").stop()
    ensure_token(project.dir)  # projects made before daemons required it get theirs now
    register_project(project.dir, project.daemon_addresses())
    started = []
    for d in project.daemons():
        was = d.pid()
        try:
            pid = d.start()
        except DaemonError:
            for s in reversed(started):  # leave nothing half-started
                if not s["already_running"]:
                    project.daemon(s["name"]).stop()
            raise
        if was is None:
            progress(f"started {d.name} (pid {pid})")
        started.append({"name": d.name, "pid": pid, "already_running": was is not None})
    return started


def stop_storage(project: Project, immediate: bool = False) -> list[dict]:
    out = []
    for d in reversed(project.daemons()):
        out.append({"name": d.name, "stopped": d.stop(immediate=immediate)})
    return out


def require_running(project: Project, names: list[str] | None = None) -> None:
    """The named daemons must run; by default the pageserver and a quorum of the safekeepers.

    The broker is best effort: everyone works on their last known state while it is away.
    """
    down_sks = []
    for d in project.daemons():
        if names and d.name not in names:
            continue
        if d.pid() is None:
            if not names and d.name in ("broker", "proxy"):  # best effort / not needed to run a compute
                continue
            if not names and d.name.startswith("sk"):
                down_sks.append(d.name)
                continue
            raise DaemonError(f"{d.name} of project {project.name!r} is not running", hint="run `neonctl start`")
    n = len(project.config.safekeepers)
    if n - len(down_sks) < n // 2 + 1:
        raise DaemonError(f"{', '.join(down_sks)} of project {project.name!r} not running: a quorum of "
                          f"{n // 2 + 1} of {n} safekeepers is needed", hint="run `neonctl start`")


def storage_status(project: Project) -> list[dict]:
    rows = []
    for d in project.daemons():
        pid = d.pid()
        state = d.state() if pid else "stopped"
        addr = d.health_url.split("/")[2]
        row = {"name": d.name, "pid": pid, "address": addr, "state": state, "log": str(d.log_file)}
        if state == "running":
            try:
                st = client.status(d.name, addr, timeout=3)
            except DaemonError:
                st = {}
            if d.name == "pageserver":
                row["timelines"] = {k: {"last_record_lsn": v["last_record_lsn"], "received_lsn": v["received_lsn"],
                                        "remote_consistent_lsn": v.get("remote_consistent_lsn")}
                                    for k, v in st.get("timelines", {}).items()}
            elif d.name.startswith("sk"):
                row["timelines"] = {k: {"term": v["term"], "flush_lsn": v["flush_lsn"], "commit_lsn": v["commit_lsn"],
                                        "streaming": v["streaming"], **({"corrupt": v["corrupt"]} if v.get("corrupt")
                                                                         else {})}
                                    for k, v in st.get("timelines", {}).items()}
        rows.append(row)
    heads: dict[str, int] = {}  # per timeline, the most advanced safekeeper's flush LSN
    for r in rows:
        if r["name"].startswith("sk"):
            for k, v in r.get("timelines", {}).items():
                if v["flush_lsn"] is not None:
                    heads[k] = max(heads.get(k, 0), v["flush_lsn"])
    for r in rows:
        if r["name"].startswith("sk"):
            for k, v in r.get("timelines", {}).items():
                v["lag"] = heads[k] - v["flush_lsn"] if v["flush_lsn"] is not None else None
    return rows
