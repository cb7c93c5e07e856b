"""`neonctl layers list|stats|checkpoint`, `neonctl wal dump`, `neonctl page get`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neonctl.commands.common import OutputOpt, ProjectOpt
from neonctl.engine.lsn import parse_lsn
from neonctl.engine.project import load_project
from neonctl.errors import InvalidInput, NotFound
from neonctl.output import Format, emit

layers_app = typer.Typer(help="The pageserver's layer files (key range x LSN range).", no_args_is_help=True)
wal_app = typer.Typer(help="WAL as stored for a branch.", no_args_is_help=True)
def _engine():
    """The inspection engine (layers, WAL scans: numpy, numba, DuckDB), loaded on first use so that the
    CLI's start-up and every other command stay light."""
    from neonctl.engine import inspect  # noqa: PLC0415

    return inspect


page_app = typer.Typer(help="Pages as the pageserver stores them.", no_args_is_help=True)

BranchOpt = Annotated[str, typer.Option("--branch", "-b", help="Branch name.")]


@layers_app.command("list")
def layers_list(branch: Annotated[str | None, typer.Option("--branch", "-b", help="Only this branch.")] = None,
                project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List layer files with kind, level, key range, LSN range, size and value count."""
    rows = _engine().layer_rows(load_project(project), branch)
    emit(rows, output, ["branch", "kind", "level", "key_start", "key_end", "lsn_range", "file_size", "num_values"])


@layers_app.command("stats")
def layers_stats(branch: BranchOpt = "main", project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Layer counts and bytes by kind/level, and read amplification per key range."""
    s = _engine().layer_stats(load_project(project), branch)
    if output == Format.table:
        emit(s["totals"], output)
        open_layer = f"{s['open_layer']['values']} values" if s["open_layer"] else "unknown (pageserver stopped)"
        print(f"\nmax read amplification: {s['max_read_amplification']}; disk consistent at "
              f"{s['disk_consistent_lsn']:X}; open layer {open_layer}")
    else:
        emit(s, output)


@layers_app.command("checkpoint")
def layers_checkpoint(branch: BranchOpt = "main",
                      compact: Annotated[bool, typer.Option("--compact", help="Also compact L0 layers now.")] = False,
                      project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """Freeze the branch's open layer into an L0 delta now (and optionally compact)."""
    emit(_engine().checkpoint(load_project(project), branch, compact), output)


@layers_app.command("query")
def layers_query(sql: Annotated[str | None, typer.Argument(
                     help="SQL over the views layers, branch_layers, timelines, relations, commits, wal, gc, "
                          "daemons, read_amplification (docs/explorer.md).")] = None,
                 file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the SQL from this file.",
                                                           dir_okay=False)] = None,
                 project: ProjectOpt = None,
                 output: Annotated[str, typer.Option("--output", "-o", help="table, json or csv.")] = "table") -> None:
    """DuckDB SQL over the project's storage metadata (works with the daemons stopped)."""
    from neonctl.engine.explorer.query import FORMATS, query_project, render  # noqa: PLC0415 - DuckDB on use

    if output not in FORMATS:
        raise InvalidInput(f"invalid output format {output!r}: one of {', '.join(FORMATS)}")
    if (sql is None) == (file is None):
        raise InvalidInput("give the SQL as an argument or with -f FILE (one of them)")
    if file is not None:
        try:
            sql = file.read_text()
        except OSError as e:
            raise InvalidInput(f"cannot read {file}: {e.strerror}") from None
    print(render(*query_project(load_project(project), sql), output))


@wal_app.command("dump")
def wal_dump(branch: BranchOpt = "main",
             start: Annotated[str | None, typer.Option("--from", help="Start LSN (default: branch start).")] = None,
             end: Annotated[str | None, typer.Option("--to", help="End LSN (default: head).")] = None,
             limit: Annotated[int, typer.Option("--limit", help="At most this many records.")] = 1000,
             project: ProjectOpt = None, output: OutputOpt = Format.table) -> None:
    """List WAL records (like pg_waldump) from the branch's stored WAL."""
    rows = _engine().wal_records(load_project(project), branch, parse_lsn(start) if start else None,
                              parse_lsn(end) if end else None, limit)
    emit(rows, output, ["lsn", "end_lsn", "rmgr", "type", "len", "xid", "blocks"])


@page_app.command("get")
def page_get(
    rel: Annotated[str, typer.Argument(help="SPC/DB/RELFILENODE, or a table name (needs a running endpoint).")],
    block: Annotated[int, typer.Argument(help="Block number.")],
    branch: BranchOpt = "main",
    lsn: Annotated[str | None, typer.Option("--lsn", help="Read as of this LSN (default: head).")] = None,
    fork: Annotated[str, typer.Option("--fork", help="main, fsm, vm or init.")] = "main",
    dump: Annotated[
        Path | None, typer.Option("--dump", help="Write the 8 KiB page to this file.", dir_okay=False)
    ] = None,
    versions_only: Annotated[
        bool, typer.Option("--versions-only", help="Only list the stored versions; do not reconstruct the page.")
    ] = False,
    project: ProjectOpt = None,
    output: OutputOpt = Format.table,
) -> None:
    """Show one page at an LSN: its header and the versions the pageserver holds (newest first).

    The page is what Postgres reads there: an image layer's copy, or replayed by Postgres (the
    pageserver materialises the branch at the LSN for it, which takes a moment on a big database).
    """
    p = load_project(project)
    r = _engine().parse_rel(rel) if "/" in rel else _engine().rel_from_table(p, branch, rel)
    if dump is not None and versions_only:
        raise InvalidInput("--dump needs the page: drop --versions-only")
    if dump is not None and not dump.parent.is_dir():
        raise InvalidInput(f"--dump: directory {dump.parent} does not exist")
    res = _engine().page_versions(p, branch, r, fork, block, parse_lsn(lsn) if lsn else None, page=not versions_only)
    page = res.get("page")
    if dump is not None:
        if page["image"] is None:
            raise NotFound(f"block {block} does not exist at {page['lsn']}: nothing written to {dump}")
        dump.write_bytes(page["image"])
    if page is not None:
        page.pop("image")
    if output == Format.table:
        print(f"key {res['key']}  complete: {'yes' if res['complete'] else 'no (needs older history)'}")
        if page is not None:
            if page["exists"]:
                how = (
                    f"replayed by Postgres ({page['versions_replayed']} stored versions)"
                    if page["source"] == "postgres redo"
                    else "from an image layer"
                )
                print(f"page at {page['lsn']} {how}:")
                print("  " + "  ".join(f"{k} {v}" for k, v in page["header"].items()))
            else:
                print(f"page at {page['lsn']}: the block does not exist there")
        emit(res["versions"], output, ["lsn", "kind", "will_init", "length", "page_lsn"])
    else:
        emit(res, output)
