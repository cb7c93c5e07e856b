"""Connection strings users get: through the proxy (the default), pooled, or straight to a compute.

Neon's shapes, on 127.0.0.1: the proxy URI names its branch with the startup option `endpoint=` (Neon puts
the endpoint in the host name; locally there is one host, so the option carries it), with `-pooler` for
PgBouncer, and `BRANCH@LSN|TIME` for a read-only time-travel connection. Passwords are printed, as Neon's
console prints them: the secret is the project's, kept in its 0600 roles file.
"""

from __future__ import annotations

from urllib.parse import quote

from neonctl.engine.compute.endpoint import running_endpoint
from neonctl.engine.compute.pgbouncer import pgbouncer_binary
from neonctl.engine.compute.time_travel import (
    endpoint_name,
    resolve_point,
    start_time_travel,
)
from neonctl.engine.project import Project
from neonctl.engine.roles import DEFAULT_ROLE, get_role
from neonctl.engine.timepoint import TimePoint, parse_ref
from neonctl.errors import InvalidInput


def _endpoint_option(endpoint: str) -> str:
    return quote(f"endpoint={endpoint}", safe="")


def proxy_uri(project: Project, endpoint: str | None = None, role: str = DEFAULT_ROLE, database: str = "postgres",
              pooled: bool = False) -> str:
    """The proxy URI for `endpoint` (a branch, `branch@LSN|TIME`; default: the default branch)."""
    r = get_role(project, role)
    if project.config.proxy_port is None:
        project.assign_proxy_ports()
    port = project.config.proxy_port
    name = (endpoint or project.config.default_branch) + ("-pooler" if pooled else "")
    return (f"postgresql://{quote(r.name, safe='')}:{quote(r.password, safe='')}@127.0.0.1:{port}/"
            f"{quote(database, safe='')}?options={_endpoint_option(name)}")


def direct_uri(project: Project, port: int, role: str = DEFAULT_ROLE, database: str = "postgres") -> str:
    """A compute's own port, bypassing the proxy (no wake-up, no pooling): SCRAM with the role's password."""
    r = get_role(project, role)
    user, password, db = quote(r.name, safe=""), quote(r.password, safe=""), quote(database, safe="")
    return f"postgresql://{user}:{password}@127.0.0.1:{port}/{db}"


def connection_info(
    project: Project,
    ref: str,
    *,
    pooled: bool = False,
    direct: bool = False,
    role: str = DEFAULT_ROLE,
    database: str = "postgres",
    progress=lambda msg: None,
) -> dict:
    """What `neonctl connection-string REF` prints: the proxy URI (nothing starts before a client connects),
    or with `direct` the compute's own port (a point in time then starts its read-only compute here)."""
    if pooled and direct:
        raise InvalidInput("--pooled goes through the proxy to PgBouncer; it cannot be --direct")
    get_role(project, role)
    point = parse_ref(ref)
    point = TimePoint(point.branch or project.config.default_branch, point.lsn, point.timestamp)
    project.branch(point.branch)
    at = point.lsn is not None or point.timestamp is not None
    if direct:
        started = False
        if at:
            st, started = start_time_travel(project, point, reuse=True, progress=progress)
            if started:
                progress(
                    f"started read-only time-travel endpoint {st.name} on port {st.port}"
                    f" (stop it with `neonctl endpoint stop {st.name}`)"
                )
        else:
            st = running_endpoint(project, point.branch)
        return {
            "branch": st.branch,
            "endpoint": st.name,
            "read_only": st.at_lsn is not None,
            "pooled": False,
            "direct": True,
            "connection_string": direct_uri(project, st.port, role, database),
        }
    if pooled:
        pgbouncer_binary()  # fail now, with the package to install, not at the first connection
    name = point.branch
    if at:  # a time becomes its LSN once, so the URI names one fixed point
        b, lsn = resolve_point(project, point)
        name = endpoint_name(b.name, lsn)
    if project.config.proxy_port is None or project.daemon("proxy").pid() is None:
        progress("the proxy is not running: `neonctl start` starts it (connections wake the compute)")
    return {
        "branch": point.branch,
        "endpoint": name,
        "read_only": at,
        "pooled": pooled,
        "direct": False,
        "connection_string": proxy_uri(project, name, role, database, pooled),
    }


def serverless_config(project: Project, progress=lambda msg: None) -> dict:
    """The `neonConfig` settings that point the `@neondatabase/serverless` driver at this project's proxy:
    `/sql` on its HTTP port for `neon()`, plain `ws://` on its WebSocket port for `Pool`/`Client`, no TLS
    (127.0.0.1), SCRAM (no pipelined password)."""
    if project.config.proxy_ws_port is None:
        project.assign_proxy_ports()
    if project.proxy_without_ws():
        progress("the running proxy predates its WebSocket port: `neonctl start` restarts it with the port")
    return {
        "fetchEndpoint": f"http://{project.proxy_http_addr}/sql",
        "wsProxy": f"{project.proxy_ws_addr}/v2",
        "useSecureWebSocket": False,
        "pipelineConnect": False,
        "forceDisablePgSSL": True,
    }


def serverless_snippet(config: dict) -> str:
    lines = ["import { neonConfig } from '@neondatabase/serverless';"]
    for k, v in config.items():
        lines.append(f"neonConfig.{k} = {'true' if v is True else 'false' if v is False else repr(v)};")
    lines.append("// on Node: import ws from 'ws'; neonConfig.webSocketConstructor = ws;")
    return "\n".join(lines)
