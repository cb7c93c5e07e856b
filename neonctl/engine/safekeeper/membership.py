"""Changing how many safekeepers a project has (`neonctl project set --safekeepers N`).

Membership changes under a running consensus are subtle (Neon has a whole RFC
for them), so neonctl does them offline: every daemon and compute stopped.
Then the most advanced copy of each timeline - the highest (last_log_term,
flush_lsn), which holds every committed byte, as an election would pick it - is
the donor:

- a new safekeeper gets a copy of the donor's timeline;
- when shrinking, each remaining safekeeper that is behind the donor is
  replaced by a copy of it, so the smaller quorum still holds every commit.

Every copy takes the highest term any safekeeper had, so a vote given in a
term is never given again by a copy. The next `endpoint start` elects a new
term among the new set, and the compute is configured with the new quorum
(`ANY q (sk1, ...)`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from neonctl.engine import ports
from neonctl.engine.compute.endpoint import list_endpoints
from neonctl.engine.project import SAFEKEEPER_BASE_PORT, Project, taken_ports
from neonctl.engine.safekeeper.control_file import load, save
from neonctl.engine.safekeeper.timeline import (
    CONTROL_FILE,
    BrokenTimeline,
    open_timeline,
    repair_hint,
)
from neonctl.errors import Conflict, CorruptData, InvalidInput


def _timeline_dirs(project: Project, sk_id: int) -> dict[str, Path]:
    root = project.safekeeper_dir(sk_id) / "timelines"
    if not root.exists():
        return {}
    return {d.name: d for d in root.iterdir() if (d / CONTROL_FILE).exists()}


def _copy(src: Path, dst: Path, term: int) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    state = load(dst / CONTROL_FILE)
    state.term = max(state.term, term)
    save(dst / CONTROL_FILE, state)


def set_safekeeper_count(project: Project, n: int, progress=lambda msg: None) -> dict:
    if not 1 <= n <= 7:
        raise InvalidInput("--safekeepers must be between 1 and 7")
    with project.lock():
        project.reload()
        old = list(project.config.safekeepers)
        if n == len(old):
            return {"safekeepers": n, "changed": False}
        running = [d.name for d in project.daemons() if d.pid() is not None]
        if running:
            raise Conflict(f"stop the project's daemons first ({', '.join(running)} running)", hint="neonctl stop")
        if list_endpoints(project):
            raise Conflict("stop the project's endpoints first", hint="neonctl endpoint stop BRANCH")
        old_ids = [sk["id"] for sk in old]
        timelines = set()
        for sk_id in old_ids:
            timelines |= set(_timeline_dirs(project, sk_id))
        plan: dict[str, tuple[Path, int, dict[int, tuple[int, int]]]] = {}
        for tid in sorted(timelines):
            copies: dict[int, tuple[int, int]] = {}
            best: tuple[tuple[int, int], Path] | None = None
            max_term = 0
            for sk_id in old_ids:
                d = _timeline_dirs(project, sk_id).get(tid)
                if d is None:
                    continue
                tl = open_timeline(d)
                if isinstance(tl, BrokenTimeline):
                    raise CorruptData(f"sk{sk_id}: timeline {tid} is damaged: {tl.corrupt}",
                                      hint=f"start the project, then {repair_hint(sk_id, single=len(old) == 1)}")
                rank = (tl.last_log_term, tl.flush_lsn)
                tl.close()
                copies[sk_id] = rank
                max_term = max(max_term, tl.term)
                if best is None or rank > best[0]:
                    best = (rank, d)
            assert best is not None
            plan[tid] = (best[1], max_term, copies)
        if n > len(old):
            taken = taken_ports() | {sk["port"] for sk in old}
            new_ports = ports.allocate(SAFEKEEPER_BASE_PORT, taken, n - len(old))
            next_id = max(old_ids) + 1
            new = old + [{"id": next_id + i, "port": p} for i, p in enumerate(new_ports)]
            for sk in new[len(old):]:
                for tid, (donor, term, _) in plan.items():
                    progress(f"sk{sk['id']}: copying timeline {tid} from {donor.parent.parent.name}")
                    _copy(donor, project.safekeeper_dir(sk["id"]) / "timelines" / tid, term)
        else:
            new = old[:n]
            kept = {sk["id"] for sk in new}
            for tid, (donor, term, copies) in plan.items():
                best_rank = max(copies.values())
                for sk_id in kept:
                    dst = project.safekeeper_dir(sk_id) / "timelines" / tid
                    if copies.get(sk_id) != best_rank and dst != donor:
                        progress(f"sk{sk_id}: replacing timeline {tid} with the copy of {donor.parent.parent.name}")
                        _copy(donor, dst, term)
            for sk in old[n:]:
                shutil.rmtree(project.safekeeper_dir(sk["id"]), ignore_errors=True)
        project.config.safekeepers = new
        project.save()
        return {"safekeepers": n, "changed": True, "ids": [sk["id"] for sk in new]}
