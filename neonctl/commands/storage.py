"""`neonctl start|stop|status`: the project's storage daemons."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import load_project
from neonctl.output import Format, emit, info


def start(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Start the storage broker, safekeepers, pageserver and proxy (harmless if running), then reconcile the
    daemons' timelines with the project's branches (leftovers of an interrupted operation are deleted)."""
    from neonctl.engine.branches import reconcile  # noqa: PLC0415
    from neonctl.engine.storage import start_storage  # noqa: PLC0415
    from neonctl.errors import DaemonError  # noqa: PLC0415

    p = load_project(project)
    started = start_storage(p, progress=info)
    try:
        res = reconcile(p)
    except DaemonError as e:  # a daemon that did not come up: the next start reconciles
        info(f"WARNING: timelines not reconciled: {e}")
    else:
        for tid in res["orphans_deleted"]:
            info(f"deleted timeline {tid}: no branch names it (an interrupted branch operation left it)")
        for tid, why in res["orphans_failed"].items():
            info(f"WARNING: could not delete orphan timeline {tid}: {why}")
        for daemon, tids in res["missing"].items():
            info(f"WARNING: {daemon} lacks the timelines of branches: {', '.join(tids)}")
    emit(started, output)


def stop(
    project: ProjectOpt = None,
    immediate: Annotated[bool, typer.Option("--immediate", help="SIGKILL instead of a clean shutdown.")] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Stop the project's daemons. Running endpoints keep running but their commits wait."""
    from neonctl.engine.storage import stop_storage  # noqa: PLC0415

    p = load_project(project)
    emit(stop_storage(p, immediate=immediate), output)


def _lsns(timelines: dict, names: dict[str, str]) -> str:
    parts = []
    for tid, v in timelines.items():
        fields = " ".join(f"{k}={format_lsn(x) if isinstance(x, int) and k.endswith('lsn') else x}"
                          for k, x in v.items())
        parts.append(f"{names[tid]}: {fields}" if len(timelines) > 1 and tid in names else fields)
    return "; ".join(parts)


def status(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Show each daemon's pid, address, state and key LSNs, and the endpoints."""
    from neonctl.engine.compute.endpoint import list_endpoints  # noqa: PLC0415
    from neonctl.engine.storage import storage_status  # noqa: PLC0415

    p = load_project(project)
    rows = storage_status(p)
    for r in rows:
        if r["name"] == "proxy":  # clients' addresses, not the health check's
            r["address"], r["http_address"] = p.proxy_addr, p.proxy_http_addr
            if p.config.proxy_ws_port is not None:  # (an old project gets it at the next `start`)
                r["ws_address"] = p.proxy_ws_addr
    if output == Format.table:
        names = {b.timeline_id: n for n, b in p.config.branches.items()}
        for r in rows:
            r["lsns"] = _lsns(r.pop("timelines", {}), names)
            if "http_address" in r:  # the proxy: Postgres, then HTTP (/sql) and WebSocket
                r["address"] = ", ".join(r[k] for k in ("address", "http_address", "ws_address") if k in r)
        emit(rows, output, ["name", "pid", "address", "state", "lsns"])
        eps = [{"branch": st.name, "port": st.port, "status": s} for st, s in list_endpoints(p)]
        if eps:
            print()
            emit(eps, output)
    else:
        emit({"daemons": rows, "endpoints": [{"branch": st.name, "port": st.port, "status": s}
                                             for st, s in list_endpoints(p)]}, output)
