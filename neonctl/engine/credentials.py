"""The project's API credential: what every request to its daemons (pageserver, safekeepers, broker, the
proxy's status) must carry, as Neon's pageserver and safekeeper APIs require JWTs.

One random token per project in `<project>/secrets/api_token` (0600 in a 0700 directory), made at `init`
(or at the next `start` of an older project). Clients send `Authorization: Bearer <token>`; a daemon
compares it in constant time and answers 401 with a JSON body otherwise. Daemons find the file through
`NEONCTL_API_TOKEN_FILE`, set when neonctl starts them; the CLI's HTTP client learns which token goes to
which daemon address when it loads the project (`register_project`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from neonctl.engine import client

ENV = "NEONCTL_API_TOKEN_FILE"


def token_path(project_dir: Path) -> Path:
    return project_dir / "secrets" / "api_token"


def ensure_token(project_dir: Path) -> str:
    """The project's token, created (0600, atomically) if it has none yet."""
    path = token_path(project_dir)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f"api_token.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def register_project(project_dir: Path, addresses: list[str]) -> None:
    """Make the HTTP client send the project's token to these daemon addresses."""
    token = read_token(token_path(project_dir))
    if token:
        for a in addresses:
            client.set_token(a, token)


def daemon_token() -> str | None:
    """In a daemon: the token its requests must carry (None when started without one, as in unit tests)."""
    f = os.environ.get(ENV)
    return read_token(Path(f)) if f else None


def auth_headers() -> dict[str, str]:
    token = daemon_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
