"""The control plane is closed to anyone without the project's credential (issue 17, first part).

Every daemon API refuses a request without the project's API token (401, JSON body) and changes nothing;
a basebackup request cannot name a path; the token is readable by its owner only.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from neonctl.engine import client
from neonctl.engine.credentials import token_path
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.safekeeper.client import SafekeeperClient


def _raw(address: str, method: str, path: str, body: dict | None = None, token: str | None = None):
    """A request as another local user would send it: no project, no registered credential."""
    saved = client._TOKENS.pop(address, None)
    try:
        if token is not None:
            client._TOKENS[address] = token
        return client.request(address, method, path, json.dumps(body).encode() if body is not None else None)
    finally:
        client._TOKENS.pop(address, None)
        if saved is not None:
            client._TOKENS[address] = saved


def test_every_daemon_refuses_requests_without_the_credential(pg18):
    tl = pg18.branch("main").timeline_id
    calls = [(pg18.pageserver_addr, "GET", "/v1/status", None),
             (pg18.pageserver_addr, "DELETE", f"/v1/timeline/{tl}", None),
             (pg18.pageserver_addr, "POST", f"/v1/timeline/{tl}/basebackup", {"endpoint": "x"}),
             (pg18.broker_addr, "GET", "/v1/status", None),
             (pg18.broker_addr, "POST", "/v1/publish", {"safekeeper_id": 9, "address": "x", "timelines": {}}),
             (pg18.proxy_http_addr, "GET", "/v1/status", None)]
    for addr in pg18.safekeeper_addrs().values():
        calls += [(addr, "GET", "/v1/status", None), (addr, "DELETE", f"/v1/timeline/{tl}", None)]
    for token in (None, "0" * 64):
        for addr, method, path, body in calls:
            r = _raw(addr, method, path, body, token)
            assert r.status == 401, (addr, method, path, r.status)
            assert json.loads(r.body)["kind"] == "Unauthorized"
    # nothing changed: the branch's timeline is still on every daemon, and the project works
    assert tl in PageserverClient(pg18.pageserver_addr).status()["timelines"]
    for i, addr in pg18.safekeeper_addrs().items():
        assert SafekeeperClient(i, addr).timeline(tl)["timeline_id"] == tl


def test_basebackup_takes_no_path_from_the_request(pg18):
    tl = pg18.branch("main").timeline_id
    for bad in ("../../etc", "/etc", "a b", "", None, "..", ".hidden", 7):
        with pytest.raises(Exception) as e:
            client.call("pageserver", pg18.pageserver_addr, "POST", f"/v1/timeline/{tl}/basebackup",
                        {"endpoint": bad, "target": "/tmp/evil", "recycle": "/etc", "timeout": 5})
        assert "invalid endpoint name" in str(e.value)
    assert not os.path.exists("/tmp/evil")


def test_credential_is_private(pg18):
    f = token_path(pg18.dir)
    assert f.stat().st_mode & 0o777 == 0o600 and f.parent.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:  # as another local user: the file cannot be read
        nobody = pwd.getpwnam("nobody")
        proc = subprocess.run(["cat", str(f)], user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr


def test_no_stored_byte_is_readable_by_another_user(pg18, home):
    assert home.stat().st_mode & 0o077 == 0, oct(home.stat().st_mode)
    if os.geteuid() != 0:
        return  # acting as another user needs root (CI runs as root); the home's mode is what protects
    nobody = pwd.getpwnam("nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": [], "capture_output": True,
                 "text": True}
    assert home.stat().st_mode & 0o077 == 0, oct(home.stat().st_mode)
    stored = next(f for f in (pg18.dir / "pageserver" / "timelines").rglob("*") if f.is_file())
    for f in (stored, pg18.dir / "project.json", pg18.dir / "pageserver" / "pageserver.log"):
        proc = subprocess.run(["head", "-c", "16", str(f)], **as_nobody)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, f
    proc = subprocess.run(["ls", str(pg18.compute_root() / "endpoints")], **as_nobody)
    listing = proc.stdout.split()
    for name in listing:  # a compute's directory (socket, data, log) is its user's alone
        d = pg18.compute_root() / "endpoints" / name
        assert subprocess.run(["ls", str(d)], **as_nobody).returncode != 0, d


def test_a_new_home_is_private_and_init_tightens_an_old_one(tmp_path):
    import sys

    fresh = tmp_path / "fresh" / "home"
    env = {**os.environ, "NEONCTL_HOME": str(fresh)}
    assert subprocess.run([sys.executable, "-m", "neonctl", "project", "list", "-o", "json"], env=env,
                          capture_output=True).returncode == 0
    assert fresh.stat().st_mode & 0o777 == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    env = {**os.environ, "NEONCTL_HOME": str(old)}
    proc = subprocess.run([sys.executable, "-m", "neonctl", "init", "--name", "tight", "-o", "json"], env=env,
                          capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stderr
        assert old.stat().st_mode & 0o777 == 0o700
    finally:
        subprocess.run([sys.executable, "-m", "neonctl", "project", "delete", "tight", "-o", "json"], env=env,
                       capture_output=True, timeout=120)
