"""Fault points (Neon's failpoints): named places where a test makes this process crash or stall.

Crash-consistency tests must hit exactly the step they mean (between two daemons of a branch delete,
between a layer file and its index, ...), which a kill from outside cannot time. Off unless armed:

* ``NEONCTL_FAILPOINTS="name[=action],..."`` in the process's environment, read at every call so a test
  arms them per command; ``action`` is ``crash`` (the default: SIGKILL of this very process, as kill -9)
  or ``sleep(MS)`` (stall, to widen a race window);
* in a daemon started with ``NEONCTL_TESTING=1``, ``PUT /v1/failpoints`` sets them at run time (the
  daemon's credential is still required); without that variable the route does not exist.

The names in use are listed in ``POINTS``, so tests and the crash trials can enumerate them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from neonctl.errors import InvalidInput

# Where each operation can be interrupted, in the order it passes them.
POINTS: dict[str, str] = {
    # the CLI
    "branch-create-after-timeline": "the daemons hold the new timeline, project.json does not name it yet",
    "branch-create-after-save": "project.json names the new branch; the command has not returned",
    "branch-delete-after-endpoint-stop": "the branch's computes are stopped, its timeline untouched",
    "timeline-drop-between-daemons": "the timeline is gone from the safekeepers, not from the pageserver",
    "branch-delete-before-save": "the timeline is gone from every daemon, project.json still names the branch",
    "branch-rename-before-save": "the new name is checked, nothing written",
    "branch-swap-after-create": "reset/restore: the new timeline exists and is recorded as pending",
    "branch-swap-after-stop": "reset/restore: the branch's computes are stopped",
    "branch-swap-after-save": "reset/restore: the branch names the new timeline; the old one is not dropped",
    "endpoint-start-before-postgres": "the data directory is materialised; Postgres is not started yet",
    "endpoint-start-after-postgres": "Postgres runs and streams to the safekeepers; no state file names it",
    "endpoint-stop-before-postgres": "an endpoint stop has begun; Postgres still runs",
    "endpoint-stop-after-postgres": "Postgres has stopped; the endpoint state still names it",
    "project-delete-after-daemons": "the project's daemons are stopped, its files still there",
    "project-delete-after-rename": "the project's directory is moved aside, not yet removed",
    # the pageserver
    "layer-written-before-index": "a new layer file is on disk, the layer index does not name it",
    "index-written": "the layer index names a new layer",
    "compaction-written-before-index": "compaction's output is on disk, the index still names its inputs",
    "ps-timeline-create-before-answer": "the pageserver made the timeline; the CLI has no answer yet",
    "ps-timeline-delete-midway": "the pageserver moved the timeline aside; its files remain",
    "ps-rebuild-midway": "an incremental rebuild has rewritten one image layer's pages of a stopped directory",
    # the safekeepers
    "sk-timeline-create-before-answer": "a safekeeper made the timeline; the CLI has no answer yet",
    "sk-timeline-delete-after-rename": "a safekeeper moved the timeline aside, the files remain",
}

_runtime: dict[str, str] = {}


def parse(spec: str) -> dict[str, str]:
    """``name[=action],...`` to {name: action}; unknown names and actions are InvalidInput."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        action = action or "crash"
        if name not in POINTS:
            raise InvalidInput(f"unknown fault point {name!r}", hint="see neonctl.engine.failpoints.POINTS")
        if action != "crash" and not (action.startswith("sleep(") and action.endswith(")")
                                      and action[6:-1].isdigit()):
            raise InvalidInput(f"fault point {name!r}: action must be crash or sleep(MS), not {action!r}")
        out[name] = action
    return out


def configure(points: dict[str, str]) -> None:
    """Replace the run-time fault points (the daemons' test-only API)."""
    checked = parse(",".join(f"{k}={v}" for k, v in points.items()))
    _runtime.clear()
    _runtime.update(checked)


def _action(name: str) -> str | None:
    if name in _runtime:
        return _runtime[name]
    spec = os.environ.get("NEONCTL_FAILPOINTS")
    if not spec:
        return None
    for item in spec.split(","):
        point, _, action = item.strip().partition("=")
        if point == name:
            return action or "crash"
    return None


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # the signal is delivered before this returns


def failpoint(name: str) -> None:
    """Crash or stall here if a test armed `name`."""
    action = _action(name)
    if action is None:
        return
    if action == "crash":
        _crash()
    time.sleep(int(action[6:-1]) / 1000)


async def afailpoint(name: str) -> None:
    """`failpoint` for a coroutine: a stall does not block the daemon's event loop."""
    action = _action(name)
    if action is None:
        return
    if action == "crash":
        _crash()
    await asyncio.sleep(int(action[6:-1]) / 1000)
