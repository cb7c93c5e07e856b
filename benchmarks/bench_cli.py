"""CLI start-up: each command's wall time as a process against the same operation through the engine API and
against the interpreter's own start-up (`python -c pass`), median of --reps runs, on one project.

A CLI call pays the interpreter, the imports of the command it runs and the operation itself; the engine API
pays only the operation. `cli - engine` is what the CLI adds. Targets (issue 10): `--help`, `branch list`,
`branch create` and `connection-string` at most 0.3 s and at most 0.2 s above `python -c pass`;
`endpoint start` at most 0.25 s above the engine API.

    python benchmarks/bench_cli.py [--reps 5] [--json]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchEnv, bench_parser, log, median, run_benchmark  # noqa: E402

from neonctl.engine.branches import branch_rows, create_branch  # noqa: E402
from neonctl.engine.compute.endpoint import read_state, start_endpoint, stop_endpoint  # noqa: E402
from neonctl.engine.connection import connection_info  # noqa: E402
from neonctl.engine.timepoint import TimePoint  # noqa: E402

NEONCTL = [sys.executable, "-m", "neonctl"]
# As on a user's machine, Python caches compiled modules; some CI images set PYTHONDONTWRITEBYTECODE, which
# would make every call compile the package again (and measure that instead). Each command runs once unmeasured.
def _cli_env() -> dict[str, str]:
    """The environment as it is now (BenchEnv has set NEONCTL_HOME by then), bytecode caching on."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(cmd: list[str]) -> float:
    env = _cli_env()
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return dt


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def body(env: BenchEnv) -> None:
    reps = env.args.reps
    p = env.project("clibench")
    proj = ["-p", p.name]
    start_endpoint(p, "main")  # connection-string on a running endpoint, as a script would ask
    rows: dict[str, dict] = {}

    def measure(name: str, cli_cmd, engine_fn=None, before=None) -> None:
        cli, eng = [], []
        if before is None:
            _wall(cli_cmd(-1))  # warm-up: bytecode cache, page cache
        for i in range(reps):
            if before:
                before(i, "cli")
            cli.append(_wall(cli_cmd(i)))
            if engine_fn is not None:
                if before:
                    before(i, "engine")
                eng.append(_timed(lambda i=i: engine_fn(i)))
        rows[name] = {"cli_s": median(cli), "engine_s": median(eng) if eng else None, "cli_runs": cli}
        log(f"{name}: cli {rows[name]['cli_s']} s, engine {rows[name]['engine_s']} s")

    measure("python -c pass", lambda i: [sys.executable, "-c", "pass"])
    measure("--version", lambda i: [*NEONCTL, "--version"])
    measure("--help", lambda i: [*NEONCTL, "--help"])
    measure("branch list", lambda i: [*NEONCTL, "branch", "list", *proj], lambda i: branch_rows(p))
    measure("branch create", lambda i: [*NEONCTL, "branch", "create", "--name", f"cli{i}".replace("-", "w"), *proj],
            lambda i: create_branch(p, f"eng{i}", TimePoint(None)))
    measure("connection-string", lambda i: [*NEONCTL, "connection-string", "main", *proj],
            lambda i: connection_info(p, "main"))

    def fresh(i: int, side: str) -> None:  # each start begins from a stopped endpoint on its own branch
        name = f"{'cli' if side == 'cli' else 'eng'}{i}"
        if read_state(p, name) is not None:
            stop_endpoint(p, name)

    measure("endpoint start", lambda i: [*NEONCTL, "endpoint", "start", f"cli{i}", *proj],
            lambda i: start_endpoint(p, f"eng{i}"), before=fresh)
    for i in range(reps):
        for side in ("cli", "eng"):
            stop_endpoint(p, f"{side}{i}")
    base = rows["python -c pass"]["cli_s"]
    for r in rows.values():
        r["over_python_s"] = round(r["cli_s"] - base, 3)
        r["over_engine_s"] = None if r["engine_s"] is None else round(r["cli_s"] - r["engine_s"], 3)
    env.result["commands"] = rows
    env.result["reps"] = reps


def render(res: dict) -> list[str]:
    rows = res.get("commands", {})
    out = ["", f"CLI wall time, median of {res.get('reps')} runs (seconds)", "",
           f"{'command':<20} {'cli':>7} {'engine API':>11} {'cli - engine':>13} {'cli - python':>13}"]
    for name, r in rows.items():
        eng = "" if r["engine_s"] is None else f"{r['engine_s']:.3f}"
        over_eng = "" if r["over_engine_s"] is None else f"{r['over_engine_s']:.3f}"
        out.append(f"{name:<20} {r['cli_s']:>7.3f} {eng:>11} {over_eng:>13} {r['over_python_s']:>13.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--reps", type=int, default=5, help="runs per command (the median is reported)")
    args = ap.parse_args(argv)
    return run_benchmark(args, "cli", body, render)


if __name__ == "__main__":
    sys.exit(main())
