"""A daemon is found through the lock it holds for its life, so a lost or garbled pid file never orphans it."""

from __future__ import annotations

import json


def _broker(cli, p) -> dict:
    return next(d for d in json.loads(cli("status", "-p", p.name, "-o", "json")[1])["daemons"] if d["name"] == "broker")


def test_lost_or_garbled_pid_file_does_not_orphan_the_daemon(pg18, cli):
    d = pg18.daemon("broker")
    before = _broker(cli, pg18)
    assert before["state"] == "running"
    for damage in (lambda: d.pid_file.unlink(), lambda: d.pid_file.write_text("garbage\n"),
                   lambda: d.pid_file.write_text("1\n")):
        damage()
        now = _broker(cli, pg18)
        assert now["state"] == "running" and now["pid"] == before["pid"], now
        assert d.pid_file.read_text().strip() == str(before["pid"])  # the hint is repaired
    d.pid_file.unlink()
    cli("stop", "-p", pg18.name)  # finds every daemon, the broker through its lock
    assert _broker(cli, pg18)["state"] == "stopped"
    cli("start", "-p", pg18.name)  # no "address already in use": nothing was left behind
    assert _broker(cli, pg18)["state"] == "running"
