"""`neonctl safekeeper list|start|stop|repair`: one safekeeper at a time, for operators and tests."""

from __future__ import annotations

from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import load_project
from neonctl.output import Format, emit

app = typer.Typer(help="Safekeepers one by one: list, start, stop (kill -9 with --immediate), repair.",
                  no_args_is_help=True)

SkArg = Annotated[int, typer.Argument(help="Safekeeper number (1..N).")]
COLUMNS = ["safekeeper", "state", "branch", "term", "flush_lsn", "commit_lsn", "lag", "streaming", "error"]


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        for k in ("flush_lsn", "commit_lsn"):
            r[k] = format_lsn(r[k]) if r.get(k) is not None else None
        lag = r.get("lag_bytes")
        r["lag"] = None if lag is None else "0" if lag == 0 else f"{lag / 1024:.1f} KiB" if lag < 1 << 20 \
            else f"{lag / (1 << 20):.1f} MiB"
        out.append(r)
    return out


@app.command("list")
def list_cmd(project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Each safekeeper's term, flush and commit LSN and lag, per branch."""
    from neonctl.engine.safekeeper.admin import safekeeper_rows  # noqa: PLC0415

    rows = safekeeper_rows(load_project(project))
    emit(table_rows(rows) if output == Format.table else rows, output, COLUMNS)


@app.command("start")
def start_cmd(sk: SkArg, project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Start one safekeeper (harmless if running); it catches up from its peers."""
    from neonctl.engine.safekeeper.admin import start_safekeeper  # noqa: PLC0415

    emit(start_safekeeper(load_project(project), sk), output)


@app.command("stop")
def stop_cmd(
    sk: SkArg,
    project: ProjectOpt = None,
    immediate: Annotated[
        bool, typer.Option("--immediate", help="SIGKILL (kill -9) instead of a clean shutdown.")
    ] = False,
    output: OutputOpt = Format.table,
) -> None:
    """Stop one safekeeper. With a quorum of the others running, commits go on."""
    from neonctl.engine.safekeeper.admin import stop_safekeeper  # noqa: PLC0415

    emit(stop_safekeeper(load_project(project), sk, immediate=immediate), output)


@app.command("repair")
def repair_cmd(sk: SkArg, project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Rebuild a safekeeper's damaged timelines (bad control file or WAL) from its peers.

    A project's only safekeeper has no peers: its damaged timeline is rebuilt at the end of the WAL the
    pageserver holds, after the branch's compute is stopped. WAL only the safekeeper had beyond that is lost;
    the result says exactly which (lost_from, lost_to, lost_bytes).
    """
    from neonctl.engine.safekeeper.admin import repair_safekeeper  # noqa: PLC0415

    rows = repair_safekeeper(load_project(project), sk)
    columns = ["safekeeper", "branch", "repaired", "term", "was"]
    if any("summary" in r for r in rows):  # rebuilt from the pageserver: say what was lost
        columns = ["safekeeper", "branch", "repaired", "term", "summary"]
    emit(rows, output, columns)
