"""The `neonctl` command line: wires the command modules into one typer app.

Errors from the engine (NeonctlError) are printed as one line on stderr with a
non-zero exit code; nothing else is caught, so a bug still shows a traceback.

Start-up is part of the product (scripts call the CLI hundreds of times), so the
app is built from a table: a call that names a command imports only that
command's module and lets typer inspect only its functions; the full app is
built for root help, completion and `neonctl.cli.app`.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field

# typer renders help with rich panels, which costs more than the rest of the CLI's start-up together; they are
# worth it on a terminal only. Set before typer is imported (it reads the variable once).
if not sys.stdout.isatty():
    os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402

from neonctl import __version__  # noqa: E402
from neonctl.errors import NeonctlError  # noqa: E402

# typer's usage errors (its vendored click's ClickException and subclasses) all derive from TyperException.
_USAGE_ERRORS = (typer.TyperException,)


@dataclass(frozen=True)
class Entry:
    """One top-level name: a sub-app (`group`) or a single command taken from a command module."""

    name: str
    module: str
    attr: str
    group: bool = False
    hidden: bool = False
    settings: dict = field(default_factory=dict)


_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
# In the order `neonctl --help` lists them.
COMMANDS = (
    Entry("init", "project", "init"),
    Entry("project", "project", "app", group=True),
    Entry("projects", "project", "app", group=True, hidden=True),
    Entry("start", "storage", "start"),
    Entry("stop", "storage", "stop"),
    Entry("status", "storage", "status"),
    Entry("safekeeper", "safekeeper", "app", group=True),
    Entry("safekeepers", "safekeeper", "app", group=True, hidden=True),
    Entry("endpoint", "endpoint", "app", group=True),
    Entry("endpoints", "endpoint", "app", group=True, hidden=True),
    Entry("connection-string", "endpoint", "connection_string"),
    Entry("cs", "endpoint", "connection_string", hidden=True),
    Entry("psql", "endpoint", "psql", settings=_EXTRA_ARGS),
    Entry("roles", "roles", "app", group=True),
    Entry("role", "roles", "app", group=True, hidden=True),
    Entry("checkout", "checkout", "checkout"),
    Entry("quickstart", "quickstart", "quickstart"),
    Entry("branch", "branch", "app", group=True),
    Entry("branches", "branch", "app", group=True, hidden=True),
    Entry("lsn", "branch", "lsn_cmd"),
    Entry("layers", "inspect", "layers_app", group=True),
    Entry("wal", "inspect", "wal_app", group=True),
    Entry("page", "inspect", "page_app", group=True),
    Entry("tui", "tui", "tui"),
    Entry("gc", "gc", "gc"),
)
_BY_NAME = {e.name: e for e in COMMANDS}


def _version(value: bool) -> None:
    if value:
        print(f"neonctl {__version__}")
        raise typer.Exit()


def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          context_file: str = typer.Option(None, "--context-file",
                                           help="A .neon context file (default: the nearest one upwards).")) -> None:
    if context_file:
        os.environ["NEONCTL_CONTEXT_FILE"] = context_file


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or with just `only` (what a call naming that command needs)."""
    app = typer.Typer(
        name="neonctl",
        help="Local, branchable serverless Postgres: Neon's storage/compute split on your machine.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,
    )
    app.callback()(_root)
    for e in COMMANDS:
        if only is not None and e.name != only:  # "" registers none
            continue
        target = getattr(importlib.import_module(f"neonctl.commands.{e.module}"), e.attr)
        if e.group:
            app.add_typer(target, name=e.name, hidden=e.hidden)
        else:
            app.command(e.name, hidden=e.hidden, context_settings=e.settings or None)(target)
    return app


def _command_named(argv: list[str]) -> str | None:
    """The top-level command a call names (its first argument, when no root option comes before it)."""
    if os.environ.get("_NEONCTL_COMPLETE") or not argv:
        return None
    if argv == ["--version"]:
        return ""  # no command at all
    if argv[0].startswith("-"):
        return None
    return argv[0] if argv[0] in _BY_NAME else None


def __getattr__(name: str):
    if name == "app":  # the full app, for tests, docs and completion scripts
        return build_app()
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    app = build_app(_command_named(args))
    context_env = os.environ.get("NEONCTL_CONTEXT_FILE")  # --context-file sets it for this call only
    try:
        rv = app(args=args, standalone_mode=False, prog_name="neonctl")
    except NeonctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except _USAGE_ERRORS as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if context_env is None:
            os.environ.pop("NEONCTL_CONTEXT_FILE", None)
        else:
            os.environ["NEONCTL_CONTEXT_FILE"] = context_env
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
