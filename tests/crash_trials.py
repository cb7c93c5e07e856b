"""Crash trials (issue 17): kill a command or a daemon at one of its fault points, recover, check the project.

Each trial picks an operation (branch create, delete, rename, reset, restore, endpoint start/stop, project
delete) and one of the fault points it passes (`neonctl.engine.failpoints.POINTS`), in the CLI or in a
daemon, runs it as a real `neonctl` process until that point SIGKILLs the process, then recovers the way a
user would: the same command again and `neonctl start` (in a random order for a CLI crash; a dead daemon
has to be started first). Then it checks what must hold after any crash:

* no orphan: the pageserver and the safekeepers hold exactly the timelines of the project's branches, and
  no pending intent is left;
* no stuck branch: the operation's effect is there, its branch starts and is deleted;
* no untracked compute: every Postgres running in the project's compute directories is an endpoint that a
  state file records;
* no lost commit: a ledger table on `main` gets a committed row per trial; main, and every branch the trial
  makes from it, hold exactly the rows committed before their point (the oracle).

Run as a script for the seeded randomised trials (`python tests/crash_trials.py --trials 100 --seed 17`);
`tests/integration/test_crash_trials.py` runs every (operation, fault point) pair once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from neonctl.engine import client
from neonctl.engine.compute.endpoint import postgres_pid, read_state
from neonctl.engine.failpoints import POINTS
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.process import pid_alive
from neonctl.engine.project import Project
from neonctl.engine.safekeeper.client import SafekeeperClient

CREATE_POINTS = ["ps-timeline-create-before-answer", "sk-timeline-create-before-answer"]
DROP_POINTS = ["timeline-drop-between-daemons", "ps-timeline-delete-midway", "sk-timeline-delete-after-rename"]
SWAP_POINTS = ["branch-swap-after-create", "branch-swap-after-stop", "branch-swap-after-save"]

# operation -> the fault points it passes
OPERATIONS: dict[str, list[str]] = {
    "branch create": ["branch-create-after-timeline", "branch-create-after-save", *CREATE_POINTS],
    "branch delete": ["branch-delete-after-endpoint-stop", "branch-delete-before-save", *DROP_POINTS],
    "branch rename": ["branch-rename-before-save"],
    "branch reset": [*SWAP_POINTS, *CREATE_POINTS, *DROP_POINTS],
    "branch restore": [*SWAP_POINTS, *CREATE_POINTS],
    "endpoint start": ["endpoint-start-before-postgres", "endpoint-start-after-postgres"],
    "endpoint stop": ["endpoint-stop-before-postgres", "endpoint-stop-after-postgres"],
    "project delete": ["project-delete-after-daemons", "project-delete-after-rename"],
}
WEIGHTS = {"project delete": 0.3}  # a project of its own per trial: the slow one, drawn less often


def all_pairs() -> list[tuple[str, str]]:
    return [(op, point) for op, points in OPERATIONS.items() for point in points]


class TrialFailed(AssertionError):
    pass


@dataclass
class Outcome:
    trial: int
    operation: str
    point: str
    order: str
    crashed: bool
    seconds: float
    problems: list[str] = field(default_factory=list)


class CrashTrials:
    """One project (`crash`) in a home of its own, its `main` endpoint running a ledger of commits."""

    def __init__(self, home: Path, project: str = "crash"):
        self.home = home
        self.name = project
        self.env = {**os.environ, "NEONCTL_HOME": str(home), "NEONCTL_TESTING": "1"}
        self.env.pop("NEONCTL_FAILPOINTS", None)
        self.ledger: list[int] = []

    # -- running neonctl ------------------------------------------------------

    def neonctl(self, *args: str, failpoints: str | None = None, check: bool = True,
                project: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if failpoints:
            env["NEONCTL_FAILPOINTS"] = failpoints
        argv = [sys.executable, "-m", "neonctl", *args]
        if args[0] != "init" and args[:2] != ("project", "delete"):
            argv += ["-p", project or self.name]
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        if check and res.returncode != 0:
            raise TrialFailed(f"`neonctl {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def project(self, name: str | None = None) -> Project:
        return Project(self.home / "projects" / (name or self.name))

    def setup(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.neonctl("init", "--name", self.name, "-o", "json")
        self.neonctl("start")
        self.neonctl("endpoint", "start", "main")
        with self.connect("main") as conn:
            conn.execute("CREATE TABLE ledger (id int PRIMARY KEY)")

    def teardown(self) -> None:
        self.neonctl("project", "delete", self.name, "--yes", check=False)

    def connect(self, branch: str) -> psycopg.Connection:
        dsn = self.neonctl("connection-string", branch, "--direct").stdout.strip()
        return psycopg.connect(dsn, autocommit=True, connect_timeout=20)

    # -- the ledger (no lost commits) ------------------------------------------

    def commit_row(self, n: int) -> str:
        """Commit ledger row n on main; returns main's flush LSN after it (a point that includes it)."""
        with self.connect("main") as conn:
            conn.execute("INSERT INTO ledger VALUES (%s)", (n,))
            self.ledger.append(n)
            return conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]

    def rows(self, branch: str) -> list[int]:
        with self.connect(branch) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM ledger ORDER BY id")]

    def expect_rows(self, branch: str, upto: int, problems: list[str]) -> None:
        want = [n for n in self.ledger if n <= upto]
        got = self.rows(branch)
        if got != want:
            problems.append(f"{branch} holds ledger rows {_diff(got, want)}")

    # -- invariants --------------------------------------------------------------

    def held_timelines(self, p: Project) -> dict[str, set[str]]:
        held = {"pageserver": set(PageserverClient.of(p).status()["timelines"])}
        for sk in SafekeeperClient.all_of(p).values():
            held[sk.name] = set(sk.status()["timelines"])
        return held

    def check_consistent(self, problems: list[str]) -> None:
        p = self.project()
        named = {b.timeline_id: b.name for b in p.config.branches.values()}
        for daemon, tids in self.held_timelines(p).items():
            if tids - set(named):
                problems.append(f"orphan timelines on {daemon}: {sorted(tids - set(named))}")
            if set(named) - tids:
                problems.append(f"{daemon} lacks the timelines of {sorted(named[t] for t in set(named) - tids)}")
        if p.config.pending_timelines:
            problems.append(f"pending intents left: {sorted(p.config.pending_timelines)}")
        problems.extend(untracked_postgres(p))

    def arm_daemon(self, point: str) -> list[int]:
        """Arm `point` in the daemons that pass it; returns their pids."""
        p = self.project()
        if point.startswith("ps-"):
            client.set_failpoints("pageserver", p.pageserver_addr, {point: "crash"})
            return [p.daemon("pageserver").pid()]
        for i, addr in p.safekeeper_addrs().items():
            client.set_failpoints(f"sk{i}", addr, {point: "crash"})
        return [p.daemon(f"sk{i}").pid() for i in p.safekeeper_addrs()]

    def disarm_daemons(self) -> None:
        p = self.project()
        for name, addr in [("pageserver", p.pageserver_addr),
                           *((f"sk{i}", a) for i, a in p.safekeeper_addrs().items())]:
            try:
                client.set_failpoints(name, addr, {})
            except Exception:  # noqa: BLE001 - a daemon the trial killed; `start` brings it back unarmed
                pass

    # -- one trial -----------------------------------------------------------------

    def run(self, n: int, op: str, point: str, rng: random.Random) -> Outcome:
        t0 = time.monotonic()
        b = f"t{n}"
        in_daemon = point.startswith(("ps-", "sk-"))
        order = "start,retry" if in_daemon or rng.random() < 0.5 else "retry,start"
        problems: list[str] = []
        other = f"crashp{n}"
        # set-up, without faults
        if op == "project delete":
            self.neonctl("init", "--name", other, "-o", "json")
            self.neonctl("start", project=other)
        elif op != "branch create":
            self.neonctl("branch", "create", "--name", b, "--parent", "main")
            if op == "endpoint stop" or (op in ("branch delete", "branch reset") and rng.random() < 0.5):
                self.neonctl("endpoint", "start", b)
        made_before = self.ledger[-1] if self.ledger else 0
        lsn = self.commit_row(n)
        argv = {
            "branch create": ["branch", "create", "--name", b, "--parent", "main"],
            "branch delete": ["branch", "delete", b, "--force"],
            "branch rename": ["branch", "rename", b, f"{b}r"],
            "branch reset": ["branch", "reset", b, "--parent"],
            "branch restore": ["branch", "restore", b, f"main@{lsn}", "--preserve-under-name", f"{b}old"],
            "endpoint start": ["endpoint", "start", b],
            "endpoint stop": ["endpoint", "stop", b],
            "project delete": ["project", "delete", other, "--yes"],
        }[op]
        proj = other if op == "project delete" else None
        daemon_pids = _daemon_pids(self.project(other)) if op == "project delete" else []
        # the crash
        if in_daemon:
            armed = self.arm_daemon(point)
            res = self.neonctl(*argv, check=False, project=proj)
            crashed = any(not pid_alive(pid) for pid in armed)
            if not crashed and res.returncode != 0:
                problems.append(f"the command failed without reaching {point}: {res.stderr.strip()}")
        else:
            res = self.neonctl(*argv, failpoints=point, check=False, project=proj)
            crashed = res.returncode == -signal.SIGKILL
            if not crashed and res.returncode != 0:
                problems.append(f"the command failed without reaching {point}: {res.stderr.strip()}")
        # the recovery
        for step in order.split(","):
            if step == "start":
                if op == "project delete":
                    self.neonctl("start", check=False, project=other)
                self.neonctl("start")
                self.disarm_daemons()
            else:
                retry = self.neonctl(*argv, check=False, project=proj)
                if retry.returncode != 0 and not already_done(op, retry.stderr):
                    problems.append(f"the retry failed: {retry.stderr.strip()}")
        # the checks
        self.check_consistent(problems)
        p = self.project()
        if op == "project delete":
            if (self.home / "projects" / other).exists() or list((self.home / "projects").glob(".deleted-*")):
                problems.append(f"project {other} is not gone")
            alive = [pid for pid in daemon_pids if pid_alive(pid)]
            if alive:
                problems.append(f"daemons of the deleted project still run: {alive}")
        elif op == "branch delete":
            if b in p.config.branches:
                problems.append(f"branch {b} still exists")
        else:
            target = f"{b}r" if op == "branch rename" else b
            if target not in p.config.branches:
                problems.append(f"branch {target} does not exist")
            else:
                running = read_state(p, target)
                if op == "endpoint stop":
                    if running is not None:
                        problems.append(f"the endpoint of {target} still runs")
                elif running is None:
                    self.neonctl("endpoint", "start", target)
                upto = n if op in ("branch create", "branch reset", "branch restore") else made_before
                if op != "endpoint stop":
                    self.expect_rows(target, upto, problems)
            for name in [x for x in p.config.branches if x.startswith(b)]:
                r = self.neonctl("branch", "delete", name, "--force", check=False)
                if r.returncode != 0:
                    problems.append(f"branch {name} cannot be deleted: {r.stderr.strip()}")
            self.check_consistent(problems)
        return Outcome(n, op, point, order, crashed, time.monotonic() - t0, problems)

    def check_ledger(self) -> list[str]:
        problems: list[str] = []
        self.expect_rows("main", max(self.ledger, default=0), problems)
        return problems


def already_done(op: str, stderr: str) -> bool:
    """A retry refused because the first attempt got to the end before it was killed."""
    done = {"branch create": "already exists", "branch delete": "does not exist",
            "branch rename": "does not exist", "branch restore": "already exists",
            "endpoint start": "already running", "endpoint stop": "no endpoint is running",
            "project delete": "does not exist"}
    return op in done and done[op] in stderr


def untracked_postgres(p: Project) -> list[str]:
    """Every Postgres running in one of the project's compute directories must be an endpoint's."""
    tracked = set()
    for f in (p.dir / "endpoints").glob("*.json"):
        st = read_state(p, f.stem)
        if st is not None:
            tracked.add(Path(st.pgdata).resolve())
    out = []
    for pid_file in p.compute_root().glob("**/postmaster.pid"):
        pgdata = pid_file.parent.resolve()
        if postgres_pid(pgdata) is not None and pgdata not in tracked:
            out.append(f"an untracked Postgres runs in {pgdata}")
    return out


def _daemon_pids(p: Project) -> list[int]:
    out = []
    for f in p.dir.glob("**/*.pid"):
        try:
            out.append(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _diff(got: list[int], want: list[int]) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    return f"missing {missing[:10]} extra {extra[:10]} ({len(got)} rows, {len(want)} expected)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--json", help="write every trial's outcome here")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    ops = list(OPERATIONS)
    weights = [WEIGHTS.get(o, 1.0) for o in ops]
    home = Path(tempfile.mkdtemp(prefix="neonctl-crash-trials-"))
    os.environ["NEONCTL_HOME"] = str(home)  # the engine's readers in this process (the checks) use it too
    trials = CrashTrials(home)
    outcomes: list[Outcome] = []
    trials.setup()
    try:
        for n in range(1, args.trials + 1):
            op = rng.choices(ops, weights)[0]
            point = rng.choice(OPERATIONS[op])
            o = trials.run(n, op, point, rng)
            outcomes.append(o)
            flag = "ok" if not o.problems else "FAILED: " + "; ".join(o.problems)
            print(f"trial {n:3d} {op:15s} {point:36s} {'crashed' if o.crashed else 'ran through':11s} "
                  f"{o.order:11s} {o.seconds:5.1f}s {flag}", flush=True)
            if n % 10 == 0 or n == args.trials:
                lost = trials.check_ledger()
                if lost:
                    o.problems.extend(lost)
                    print(f"after trial {n}: LOST COMMITS: {lost}", flush=True)
    finally:
        trials.teardown()
        shutil.rmtree(home, ignore_errors=True)
    failed = [o for o in outcomes if o.problems]
    summary = {
        "trials": len(outcomes), "seed": args.seed, "crashed": sum(o.crashed for o in outcomes),
        "failed": len(failed), "by_operation": Counter(o.operation for o in outcomes),
        "points_hit": len({o.point for o in outcomes if o.crashed}), "points": len({p for _, p in all_pairs()}),
        "seconds": round(sum(o.seconds for o in outcomes), 1),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "trials": [o.__dict__ for o in outcomes]},
                                              indent=1))
    return 1 if failed else 0


assert all(p in POINTS for _, p in all_pairs())  # every point a trial arms exists

if __name__ == "__main__":
    sys.exit(main())
