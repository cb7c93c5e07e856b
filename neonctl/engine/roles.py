"""Roles and their passwords: the project's half of Neon's compute spec.

As in Neon, the control plane owns roles: the project keeps each role's password
(neonctl prints it in connection strings, as Neon's console does) and its
SCRAM-SHA-256 verifier in ``<project>/secrets/roles.json`` (0600, directory 0700).
The proxy authenticates clients against these verifiers without asking a compute,
and every read-write compute is brought in line with them when it starts (only
roles whose stored verifier differs are written, so a start usually writes no WAL).
Computes accept TCP connections with SCRAM only; neonctl's own connections use
the compute's Unix socket in its 0700 directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from neonctl.engine.compute.admin_query import query_rows
from neonctl.engine.durability import fsync_dir
from neonctl.engine.project import Project
from neonctl.engine.proxy.scram import make_verifier
from neonctl.errors import AlreadyExists, Conflict, CorruptData, InvalidInput, NotFound

DEFAULT_ROLE = "postgres"  # the superuser initdb made; every project has it
ROLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # URI-safe, no look-alikes


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    verifier: str
    created_at: float


def new_password() -> str:
    """16 characters from a 57-letter alphabet: ~93 bits, safe in a URI without escaping (Neon's are 12)."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(16))


def check_role_name(name: str) -> str:
    if not ROLE_RE.match(name):
        raise InvalidInput(f"invalid role name {name!r}: letters, digits and '_', not starting with a digit (max 63)")
    return name


def secrets_dir(project: Project) -> Path:
    d = project.dir / "secrets"
    d.mkdir(mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def roles_file(project: Project) -> Path:
    return secrets_dir(project) / "roles.json"


def _read(path: Path) -> dict[str, Role]:
    try:
        raw = json.loads(path.read_text())
        return {r["name"]: Role(**r) for r in raw["roles"]}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptData(f"{path} is not a valid roles file ({e})",
                          hint="restore it from a backup, or delete it and run `neonctl roles reset-password postgres`"
                          ) from None


def _write(path: Path, roles: dict[str, Role]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"roles": [asdict(r) for r in sorted(roles.values(), key=lambda r: r.name)]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _make(name: str) -> Role:
    password = new_password()
    return Role(name=name, password=password, verifier=make_verifier(password), created_at=time.time())


def load_roles(project: Project) -> dict[str, Role]:
    """The project's roles; a project made before roles existed gets its `postgres` password here, once."""
    path = roles_file(project)
    roles = _read(path)
    if DEFAULT_ROLE not in roles:
        with project.lock():
            roles = _read(path)
            if DEFAULT_ROLE not in roles:
                roles[DEFAULT_ROLE] = _make(DEFAULT_ROLE)
                _write(path, roles)
    return roles


def get_role(project: Project, name: str) -> Role:
    role = load_roles(project).get(name)
    if role is None:
        raise NotFound(f"role {name!r} does not exist in project {project.name!r}",
                       hint=f"roles: {', '.join(sorted(load_roles(project)))}")
    return role


def create_role(project: Project, name: str) -> Role:
    check_role_name(name)
    load_roles(project)
    with project.lock():
        roles = _read(roles_file(project))
        if name in roles:
            raise AlreadyExists(f"role {name!r} already exists", hint=f"`neonctl roles reset-password {name}`")
        roles[name] = _make(name)
        _write(roles_file(project), roles)
    return roles[name]


def reset_password(project: Project, name: str) -> Role:
    get_role(project, name)
    with project.lock():
        roles = _read(roles_file(project))
        roles[name] = _make(name)
        _write(roles_file(project), roles)
    return roles[name]


def delete_role(project: Project, name: str) -> Role:
    if name == DEFAULT_ROLE:
        raise Conflict(f"role {DEFAULT_ROLE!r} is the project's superuser and cannot be deleted")
    role = get_role(project, name)
    with project.lock():
        roles = _read(roles_file(project))
        roles.pop(name, None)
        _write(roles_file(project), roles)
    return role


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def sync_statements(roles: dict[str, Role], current: dict[str, str | None], dropped: list[str]) -> list[str]:
    """SQL that makes a compute's roles match the spec: create missing ones, set differing verifiers, drop
    the deleted ones. `current` maps existing login roles to their stored password (pg_authid.rolpassword)."""
    out = []
    for r in sorted(roles.values(), key=lambda r: r.name):
        if r.name not in current:
            out.append(f'CREATE ROLE "{r.name}" LOGIN CREATEDB CREATEROLE PASSWORD {_literal(r.verifier)}')
        elif current[r.name] != r.verifier:
            out.append(f'ALTER ROLE "{r.name}" LOGIN PASSWORD {_literal(r.verifier)}')
    out.extend(f'DROP ROLE IF EXISTS "{name}"' for name in dropped if name in current and name not in roles)
    return out


LOGIN_ROLES_SQL = "SELECT rolname, rolpassword FROM pg_authid WHERE rolcanlogin"


def apply_roles(project: Project, socket_dir: str, port: int, dropped: list[str] | None = None,
                logins: list[list[str | None]] | None = None) -> int:
    """Bring one running read-write compute in line with the project's roles; returns statements run.
    `logins`: the rows of LOGIN_ROLES_SQL when the caller already asked the compute (a start does, on the
    connection that checks its replay)."""
    roles = load_roles(project)
    rows = query_rows(socket_dir, port, LOGIN_ROLES_SQL) if logins is None else logins
    current = {name: pw for name, pw in rows}
    stmts = sync_statements(roles, current, dropped or [])
    if stmts:
        query_rows(socket_dir, port, "; ".join(stmts))
    return len(stmts)
