"""`neonctl quickstart`: from nothing to a working connection string in one command."""

from __future__ import annotations

import psycopg

from neonctl.commands.common import OutputOpt
from neonctl.engine.compute.endpoint import endpoint_status, read_state, start_endpoint
from neonctl.engine.lsn import format_lsn
from neonctl.engine.project import create_project, list_projects, load_project
from neonctl.engine.storage import start_storage
from neonctl.output import Format, emit, info

DEMO = "demo"


def quickstart(output: OutputOpt = Format.table) -> None:
    """Init a demo project if there is none, start storage and `main`, run a sample query."""
    if not list_projects():
        info("creating project 'demo' ...")
        project = create_project(DEMO, progress=info)
    else:
        project = load_project(None)
    start_storage(project, progress=info)
    st = read_state(project, "main")
    if st is None or endpoint_status(st) != "running":
        st = start_endpoint(project, "main", progress=info)
    with psycopg.connect(st.connection_string, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS quickstart (id serial PRIMARY KEY, note text,"
                     " at timestamptz DEFAULT now())")
        conn.execute("INSERT INTO quickstart (note) VALUES ('hello from neonctl')")
        (rows,) = conn.execute("SELECT count(*) FROM quickstart").fetchone()
        (version,) = conn.execute("SHOW server_version").fetchone()
        (lsn,) = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    result = {"project": project.name, "branch": "main", "postgres": version, "rows_in_quickstart_table": rows,
              "wal_lsn": lsn, "connection_string": st.connection_string}
    if output != Format.table:
        emit(result, output)
        return
    print(f"Project {project.name!r}: branch main is running PostgreSQL {version} (start LSN {format_lsn(st.start_lsn)}).")
    print(f"Sample query: quickstart table has {rows} row(s); WAL is at {lsn}, durable on the safekeeper.")
    print()
    print("Next steps:")
    print("  neonctl psql main                  # open psql")
    print("  neonctl endpoint stop main         # stop; the data directory is thrown away, storage keeps the data")
    print("  neonctl endpoint start main        # rebuild it from the pageserver + safekeeper")
    print("  neonctl status                     # daemons and LSNs")
    print()
    print("Connection string:")
    print(st.connection_string)
