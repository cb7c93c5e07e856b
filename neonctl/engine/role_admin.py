"""Role operations as the CLI asks for them: change the spec (`roles.py`), then every running compute.

A read-write compute that is running gets the change at once; one that is stopped or suspended gets it
at its next start, when `apply_roles` runs. Read-only time-travel computes cannot change: the proxy
authenticates against the spec anyway.
"""

from __future__ import annotations

import time

from neonctl.engine import roles
from neonctl.engine.compute.endpoint import list_endpoints
from neonctl.engine.connection import proxy_uri
from neonctl.engine.project import Project


def _apply_everywhere(project: Project, dropped: list[str] | None = None) -> list[str]:
    updated = []
    for st, status in list_endpoints(project):
        if status == "running" and st.at_lsn is None:
            roles.apply_roles(project, st.socket_dir, st.port, dropped)
            updated.append(st.name)
    return updated


def _row(project: Project, role: roles.Role, updated: list[str]) -> dict:
    return {"name": role.name, "password": role.password,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(role.created_at)),
            "computes_updated": updated, "connection_string": proxy_uri(project, role=role.name)}


def role_rows(project: Project) -> list[dict]:
    return [{"name": r.name, "password": r.password,
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created_at))}
            for r in sorted(roles.load_roles(project).values(), key=lambda r: r.name)]


def create(project: Project, name: str) -> dict:
    role = roles.create_role(project, name)
    return _row(project, role, _apply_everywhere(project))


def reset(project: Project, name: str) -> dict:
    role = roles.reset_password(project, name)
    return _row(project, role, _apply_everywhere(project))


def delete(project: Project, name: str) -> dict:
    role = roles.delete_role(project, name)
    return {"name": role.name, "deleted": True, "computes_updated": _apply_everywhere(project, [name])}
