"""Starting, stopping and inspecting a project's storage daemons as a unit."""

from __future__ import annotations

from neonctl.engine import client
from neonctl.engine.project import Project
from neonctl.errors import DaemonError


def start_storage(project: Project, progress=lambda msg: None) -> list[dict]:
    """Start broker, safekeepers and pageserver; already-running ones are left alone."""
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
    for d in project.daemons():
        if names and d.name not in names:
            continue
        if d.pid() is None:
            raise DaemonError(f"{d.name} of project {project.name!r} is not running", hint="run `neonctl start`")


def storage_status(project: Project) -> list[dict]:
    rows = []
    for d in project.daemons():
        pid = d.pid()
        state = d.state() if pid else "stopped"
        addr = d.health_url.split("/")[2]
        row = {"name": d.name, "pid": pid, "address": addr, "state": state, "log": str(d.log_file)}
        if state == "running":
            try:
                st = client.call(d.name, addr, "GET", "/v1/status", timeout=3)
            except DaemonError:
                st = {}
            if d.name == "pageserver":
                row["timelines"] = {k: {"last_record_lsn": v["last_record_lsn"], "received_lsn": v["received_lsn"]}
                                    for k, v in st.get("timelines", {}).items()}
            elif d.name.startswith("sk"):
                row["timelines"] = {k: {"term": v["term"], "flush_lsn": v["flush_lsn"], "commit_lsn": v["commit_lsn"],
                                        "streaming": v["streaming"]} for k, v in st.get("timelines", {}).items()}
        rows.append(row)
    return rows
