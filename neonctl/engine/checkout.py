"""`neonctl checkout`: one database branch per git branch (Neon's CLI convention).

Without a name, inside a git work tree, the branch is named after the current git branch (characters a
branch name cannot hold become '-'); it is created from the project's default branch if missing, its
compute is started, and a `.neon` context file at the work tree's root makes it the default for every
command run below it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from neonctl.engine.branches import create_branch
from neonctl.engine.compute.endpoint import endpoint_status, read_state, start_endpoint
from neonctl.engine.connection import proxy_uri
from neonctl.engine.context import write_context
from neonctl.engine.project import load_project
from neonctl.engine.timepoint import TimePoint
from neonctl.errors import InvalidInput, NotFound


def _git(cwd: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def branch_name_for(git_branch: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", git_branch).strip("-.")[:63]
    if not name or not name[0].isalnum():
        name = ("b" + name)[:63]
    return name


def checkout(project_name: str | None, branch: str | None, create: bool = True, cwd: Path | None = None,
             progress=lambda msg: None) -> dict:
    cwd = (cwd or Path.cwd()).resolve()
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if branch is None:
        if top is None:
            raise InvalidInput("not inside a git work tree: name the branch (`neonctl checkout BRANCH`)")
        git_branch = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
        if not git_branch or git_branch == "HEAD":
            raise InvalidInput("the git work tree has no current branch (detached HEAD): name the branch")
        branch = branch_name_for(git_branch)
    project = load_project(project_name)
    created = False
    if branch not in project.config.branches:
        project.reload()
    if branch not in project.config.branches:
        if not create:
            raise NotFound(f"branch {branch!r} does not exist in project {project.name!r}",
                           hint="drop --no-create to create it from the default branch")
        progress(f"creating branch {branch!r} from {project.config.default_branch!r} ...")
        create_branch(project, branch, TimePoint(project.config.default_branch))
        created = True
    st = read_state(project, branch)
    if st is None or endpoint_status(st) != "running":
        start_endpoint(project, branch, progress=progress)
    context = write_context(Path(top) if top else cwd, project.name, branch)
    return {"project": project.name, "branch": branch, "created": created, "context_file": str(context),
            "connection_string": proxy_uri(project, branch)}
