"""The neonctl home: where projects, daemon state and compute data directories live.

``NEONCTL_HOME`` overrides ``platformdirs.user_data_dir("neonctl")``; a new home is 0700. Compute
data directories must be reachable by the unprivileged user that runs
Postgres; when the home is not (root's home is mode 0700), they go to a
per-home directory under /var/lib/neonctl instead.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from neonctl.engine.compute.runtime import shared_dir, traversable_by_others
from neonctl.errors import InvalidInput


def home_dir() -> Path:
    env = os.environ.get("NEONCTL_HOME")
    if env:
        p = Path(env).expanduser().absolute()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import platformdirs  # noqa: PLC0415

            p = Path(platformdirs.user_data_dir("neonctl"))
    if p.exists() and not p.is_dir():
        raise InvalidInput(f"neonctl's home {p} is not a directory", hint="point NEONCTL_HOME at a directory")
    if not p.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir(mode=0o700, exist_ok=True)  # WAL, layers, logs and secrets: for their owner only
        except OSError as e:
            raise InvalidInput(f"cannot create neonctl's home {p}: {e.strerror}",
                               hint="set NEONCTL_HOME to a writable directory") from None
    return p


def tighten_home() -> None:
    """Make the home its owner's alone (0700): everything below it, WAL and layers included, is then out of
    other local users' reach. `init` calls it, so a home made by an older neonctl (0755) is fixed too."""
    p = home_dir()
    if p.stat().st_uid == os.geteuid():
        os.chmod(p, 0o700)


def projects_dir() -> Path:
    d = home_dir() / "projects"
    if not d.is_dir():
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidInput(f"cannot use {d.parent} as neonctl's home: {e.strerror}",
                               hint="set NEONCTL_HOME to a writable directory") from None
    return d


def compute_root(project_dir: Path) -> Path:
    """Directory for a project's compute data dirs, reachable by the Postgres user."""
    local = project_dir / "compute"
    if os.geteuid() != 0 or traversable_by_others(project_dir):
        local.mkdir(parents=True, exist_ok=True)
        os.chmod(local, 0o755)
        return local
    digest = hashlib.sha256(str(project_dir.resolve()).encode()).hexdigest()[:12]
    d = shared_dir("compute") / digest
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)
    return d
