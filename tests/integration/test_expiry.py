"""Branch expiry: `--ttl`/`--expires-at`, deletion by the running daemons, children and the default branch wait."""

from __future__ import annotations

import json

import pytest
from waiting import wait_until


def _branches(cli, p) -> dict:
    return {b["name"]: b for b in json.loads(cli("branch", "list", "-o", "json", "-p", p.name)[1])}


def _wait_gone(cli, p, name: str, timeout: float = 40) -> None:
    wait_until(lambda: name not in _branches(cli, p), timeout, f"expiry to delete {name}", interval=0.5)


def test_expired_branch_is_deleted_and_a_parent_waits_for_children(pg18, cli):
    p = ["-p", pg18.name]
    out = json.loads(cli("branch", "create", "--name", "exp-leaf", "--ttl", "1s", "-o", "json", *p)[1])
    assert out["expires_at"] is not None
    cli("branch", "create", "--name", "exp-parent", "--ttl", "1s", *p)
    cli("branch", "create", "--name", "exp-child", "--parent", "exp-parent", *p)
    _wait_gone(cli, pg18, "exp-leaf")
    got = json.loads(cli("branch", "get", "exp-parent", "-o", "json", *p)[1])
    assert "waiting for its child branches" in got["expiry_status"] and "exp-child" in got["expiry_status"]
    cli("branch", "delete", "exp-child", *p)
    _wait_gone(cli, pg18, "exp-parent")


def test_set_expiration_and_bad_input(pg18, cli):
    p = ["-p", pg18.name]
    cli("branch", "create", "--name", "exp-set", *p)
    try:
        assert _branches(cli, pg18)["exp-set"]["expires_at"] is None
        cli("branch", "set-expiration", "exp-set", "--expires-at", "2999-01-01T00:00:00Z", *p)
        assert _branches(cli, pg18)["exp-set"]["expires_at"] == "2999-01-01T00:00:00Z"
        cli("branch", "set-expiration", "exp-set", "--never", *p)
        assert _branches(cli, pg18)["exp-set"]["expires_at"] is None
        for args, msg in [
            (["--expires-at", "2001-01-01T00:00:00Z"], "in the past"),
            (["--expires-at", "yesterday"], "RFC 3339"),
            (["--expires-at", "2999-01-01T00:00:00"], "time zone"),
            (["--ttl", "0s"], "positive duration"),
            (["--ttl", "soon"], "positive duration"),
            (["--ttl", "1h", "--expires-at", "2999-01-01T00:00:00Z"], "not both"),
        ]:
            rc, _, err = cli("branch", "create", "--name", "exp-bad", *args, *p, ok=False)
            assert rc != 0 and msg in err and err.count("\n") == 1, (args, err)
        assert "exp-bad" not in _branches(cli, pg18)
        rc, _, err = cli("branch", "set-expiration", "main", "--ttl", "1h", *p, ok=False)
        assert rc != 0 and "default branch" in err
    finally:
        cli("branch", "delete", "exp-set", *p)


@pytest.mark.parametrize("ttl, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("45", 45)])
def test_ttl_units(ttl, seconds):
    from neonctl.engine.expiry import parse_expiry

    assert parse_expiry(None, ttl, now=1000.0) == 1000.0 + seconds
