"""The `neonctl` command line: wires the command modules into one typer app.

Errors from the engine (NeonctlError) are printed as one line on stderr with a
non-zero exit code; nothing else is caught, so a bug still shows a traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from neonctl import __version__
from neonctl.commands import branch, endpoint, gc, inspect, project, quickstart, safekeeper, storage, tui
from neonctl.errors import NeonctlError

try:  # recent typer parses with its own vendored click, whose exceptions are not click's
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    _TyperClickException = click.exceptions.ClickException
_USAGE_ERRORS = (click.exceptions.ClickException, _TyperClickException)
_ABORTS = (click.exceptions.Abort, typer.Abort)

app = typer.Typer(
    name="neonctl",
    help="Local, branchable serverless Postgres: Neon's storage/compute split on your machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        print(f"neonctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


app.command("init")(project.init)
app.add_typer(project.app, name="project")
app.add_typer(project.app, name="projects", hidden=True)
app.command("start")(storage.start)
app.command("stop")(storage.stop)
app.command("status")(storage.status)
app.add_typer(safekeeper.app, name="safekeeper")
app.add_typer(safekeeper.app, name="safekeepers", hidden=True)
app.add_typer(endpoint.app, name="endpoint")
app.add_typer(endpoint.app, name="endpoints", hidden=True)
app.command("connection-string")(endpoint.connection_string)
app.command("cs", hidden=True)(endpoint.connection_string)
app.command("psql", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(endpoint.psql)
app.command("quickstart")(quickstart.quickstart)
app.add_typer(branch.app, name="branch")
app.add_typer(branch.app, name="branches", hidden=True)
app.command("lsn")(branch.lsn_cmd)
app.add_typer(inspect.layers_app, name="layers")
app.add_typer(inspect.wal_app, name="wal")
app.add_typer(inspect.page_app, name="page")
app.command("tui")(tui.tui)
app.command("gc")(gc.gc)


def main(argv: list[str] | None = None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="neonctl")
    except NeonctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except _USAGE_ERRORS as e:
        e.show()
        return e.exit_code
    except _ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
