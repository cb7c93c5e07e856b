"""Bad input and faults: one clear line on stderr, a non-zero exit, nothing changed."""

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from waiting import wait_until

from neonctl.engine.process import pid_alive
from neonctl.engine.project import list_projects, projects_dir


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_unknown_project(cli, pg18):
    rc, out, err = cli("status", "-p", "nope", ok=False)
    assert rc != 0 and "project 'nope' does not exist" in _one_line(err)


def test_invalid_project_name(cli):
    rc, _, err = cli("init", "--name", "../evil", ok=False)
    assert rc == 2 and "invalid project name" in _one_line(err)
    assert not (projects_dir().parent / "evil").exists()


def test_unknown_branch(cli, pg18):
    rc, _, err = cli("endpoint", "start", "nobranch", "-p", "pg18", ok=False)
    assert rc != 0 and "branch 'nobranch' does not exist" in _one_line(err)


def test_init_over_existing_project_changes_nothing(cli, pg18):
    before = (pg18.dir / "project.json").read_text()
    rc, _, err = cli("init", "--name", "pg18", ok=False)
    assert rc != 0 and "already exists" in _one_line(err)
    assert (pg18.dir / "project.json").read_text() == before


def test_missing_pg_binaries(cli, tmp_path):
    names = {p.name for p in list_projects()}
    rc, _, err = cli("init", "--name", "nobin", "--pg-bin", str(tmp_path / "nothing"), ok=False)
    assert rc != 0 and "does not exist" in _one_line(err)
    assert {p.name for p in list_projects()} == names and not (projects_dir() / "nobin").exists()


def test_too_old_pg_binaries(cli, tmp_path):
    for tool in ("postgres", "initdb", "pg_ctl"):
        f = tmp_path / tool
        f.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 13.14'\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    rc, _, err = cli("init", "--name", "old", "--pg-bin", str(tmp_path), ok=False)
    assert rc != 0 and "PostgreSQL 13" in _one_line(err) and "too old" in err
    assert not (projects_dir() / "old").exists()


def test_endpoint_already_running_and_port_in_use(cli, pg18):
    cli("endpoint", "start", "main", "-p", "pg18")
    try:
        rc, _, err = cli("endpoint", "start", "main", "-p", "pg18", ok=False)
        assert rc != 0 and "already running" in _one_line(err)
    finally:
        cli("endpoint", "stop", "main", "-p", "pg18")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = cli("endpoint", "start", "main", "-p", "pg18", "--port", port, ok=False)
        assert rc != 0 and f"port {port} is already in use" in _one_line(err)
    rc, out, _ = cli("endpoint", "list", "-p", "pg18", "-o", "json")
    assert json.loads(out) == []


def test_endpoint_start_without_daemons(cli):
    cli("init", "--name", "cold")
    try:
        rc, _, err = cli("endpoint", "start", "main", "-p", "cold", ok=False)
        assert rc != 0 and "not running" in _one_line(err) and "neonctl start" in err
        assert not list((projects_dir() / "cold" / "endpoints").glob("*.json"))
    finally:
        cli("project", "delete", "cold")


def test_daemon_crash_on_start_is_reported(cli):
    cli("init", "--name", "busy")
    try:
        cfg = json.loads((projects_dir() / "busy" / "project.json").read_text())
        with socket.socket() as s:  # occupy the pageserver's port: it cannot bind and exits
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", cfg["pageserver_port"]))
            s.listen()
            rc, _, err = cli("start", "-p", "busy", ok=False)
        assert rc != 0 and "pageserver exited during start" in _one_line(err)
        rc, out, _ = cli("status", "-p", "busy", "-o", "json")
        states = {d["name"]: d["state"] for d in json.loads(out)["daemons"]}
        assert set(states.values()) == {"stopped"}, states  # the ones that did start were stopped again
        rc, out, _ = cli("start", "-p", "busy", "-o", "json")  # the port is free again: starts fine
        rc, out, _ = cli("start", "-p", "busy", "-o", "json")  # starting twice is harmless
        assert all(d["already_running"] for d in json.loads(out))
    finally:
        cli("project", "delete", "busy")


def test_stale_pid_file_is_detected(cli):
    cli("init", "--name", "stale")
    try:
        cli("start", "-p", "stale")
        rc, out, _ = cli("status", "-p", "stale", "-o", "json")
        broker = next(d for d in json.loads(out)["daemons"] if d["name"] == "broker")
        os.kill(broker["pid"], 9)
        # SIGKILL is delivered asynchronously: wait until it has died
        wait_until(lambda: not pid_alive(broker["pid"]), 10, "the killed broker to die", interval=0.01)
        rc, out, _ = cli("status", "-p", "stale", "-o", "json")
        broker = next(d for d in json.loads(out)["daemons"] if d["name"] == "broker")
        assert broker["state"] == "stopped" and broker["pid"] is None
        assert not Path(projects_dir() / "stale" / "broker" / "broker.pid").exists()
    finally:
        cli("project", "delete", "stale")


@pytest.mark.parametrize("fmt", ["json", "yaml", "table"])
def test_output_formats(cli, pg18, fmt):
    rc, out, _ = cli("project", "list", "-o", fmt)
    assert "pg18" in out
    if fmt == "json":
        assert any(p["name"] == "pg18" for p in json.loads(out))
