"""`neonctl quickstart`: from nothing to a working connection string in one command."""

from __future__ import annotations

from neonctl.commands.common import OutputOpt
from neonctl.output import Format, emit, info


def quickstart(output: OutputOpt = Format.table) -> None:
    """Init a demo project if there is none, start storage and `main`, run a sample query."""
    from neonctl.engine.lifecycle import quickstart as run_quickstart  # noqa: PLC0415 - heavy: initdb, import
    from neonctl.engine.lsn import format_lsn  # noqa: PLC0415

    result = run_quickstart(progress=info)
    if output != Format.table:
        emit(result, output)
        return
    print(f"Project {result['project']!r}: branch main is running PostgreSQL {result['postgres']}"
          f" (start LSN {format_lsn(result['start_lsn'])}).")
    print(f"Sample query: quickstart table has {result['rows_in_quickstart_table']} row(s); WAL is at"
          f" {result['wal_lsn']}, durable on the safekeeper.")
    print()
    print("Next steps:")
    print("  neonctl psql main                  # open psql")
    print("  neonctl endpoint stop main         # stop; storage keeps the data, the directory is kept as a cache")
    print("  neonctl endpoint start main        # start again: the kept directory if nothing changed, else storage")
    print("  neonctl status                     # daemons and LSNs")
    print()
    print("Connection string:")
    print(result["connection_string"])
