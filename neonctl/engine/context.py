"""The `.neon` context file: which project and branch a directory works with (Neon's CLI convention).

`neonctl checkout` writes `{"projectId": ..., "branch": ...}` at the root of a git work tree; every
command then finds the nearest `.neon` upwards from the current directory and takes its project (and,
where a command names a branch and none was given, its branch), unless `--context-file` names another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from neonctl.errors import InvalidInput

CONTEXT_FILE = ".neon"
ENV = "NEONCTL_CONTEXT_FILE"  # set by the global --context-file option


@dataclass(frozen=True)
class Context:
    path: Path
    project: str | None
    branch: str | None


def find_context_file(start: Path | None = None) -> Path | None:
    explicit = os.environ.get(ENV)
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise InvalidInput(f"context file {p} does not exist")
        return p
    d = (start or Path.cwd()).resolve()
    for candidate in (d, *d.parents):
        f = candidate / CONTEXT_FILE
        if f.is_file():
            return f
    return None


def read_context(path: Path) -> Context:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read context file {path}: {e.strerror}") from None
    except ValueError:
        raise InvalidInput(f"context file {path} is not valid JSON",
                           hint="fix or delete it; `neonctl checkout` writes a new one") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, ""), str) for k in ("projectId", "branch")):
        raise InvalidInput(f"context file {path} must be a JSON object with string projectId and branch")
    return Context(path, data.get("projectId") or None, data.get("branch") or None)


def current_context(start: Path | None = None) -> Context | None:
    f = find_context_file(start)
    return read_context(f) if f is not None else None


def write_context(directory: Path, project: str, branch: str) -> Path:
    path = directory / CONTEXT_FILE
    tmp = path.with_name(CONTEXT_FILE + ".tmp")
    tmp.write_text(json.dumps({"projectId": project, "branch": branch}, indent=1) + "\n")
    os.replace(tmp, path)
    return path
