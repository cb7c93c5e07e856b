"""The file-level rules of reusing a stopped compute's directory (pageserver/images/warm.py), on files."""

from __future__ import annotations

import json
import struct

from neonctl.engine.pageserver.images import warm


def test_reset_unlogged_keeps_only_a_copy_of_the_init_fork(tmp_path):
    db = tmp_path / "base" / "5"
    db.mkdir(parents=True)
    (tmp_path / "global").mkdir()
    for name, data in {"16384": b"data", "16384.1": b"more", "16384_fsm": b"f", "16384_vm": b"v",
                       "16384_init": b"init", "16390": b"logged", "16390_fsm": b"keep"}.items():
        (db / name).write_bytes(data)
    (db / "16384_init").chmod(0o600)
    assert warm.reset_unlogged(tmp_path) == 1
    assert {p.name: p.read_bytes() for p in db.iterdir()} == {
        "16384": b"init", "16384_init": b"init", "16390": b"logged", "16390_fsm": b"keep"}
    assert (db / "16384").stat().st_mode & 0o777 == 0o600


def test_wal_log_hints_is_read_from_the_last_setting(tmp_path):
    assert not warm.logged_hints(tmp_path)
    conf = tmp_path / "postgresql.conf"
    conf.write_text("#wal_log_hints = on\nwal_log_hints = off\n")
    assert not warm.logged_hints(tmp_path)
    conf.write_text("wal_log_hints = off\n# --- neonctl ---\nwal_log_hints = on  # comment\n")
    assert warm.logged_hints(tmp_path)


def test_no_record_or_an_unclean_control_file_is_refused(tmp_path):
    pool = tmp_path / "recycled-pgdata"
    (pool / "global").mkdir(parents=True)
    args = (100, "tl", {"tl"}, 7, lambda a, n: b"", 16 << 20)
    assert "another branch" in warm.reusable(pool, *args)
    (tmp_path / warm.RECORD).write_text(json.dumps({"timeline_id": "tl"}))
    assert "pg_control" in warm.reusable(pool, *args)
    ctl = bytearray(64)
    struct.pack_into("<Q", ctl, 0, 7)
    struct.pack_into("<i", ctl, 16, 6)  # in production: a crash or an immediate stop
    (pool / "global" / "pg_control").write_bytes(bytes(ctl))
    assert "not shut down cleanly" in warm.reusable(pool, *args)
    struct.pack_into("<Q", ctl, 0, 8)
    (pool / "global" / "pg_control").write_bytes(bytes(ctl))
    assert warm.reusable(pool, *args) == "another system"
    struct.pack_into("<Q", ctl, 0, 7)
    struct.pack_into("<i", ctl, 16, warm.DB_SHUTDOWNED)
    struct.pack_into("<Q", ctl, 32, 200)  # its checkpoint after the target
    (pool / "global" / "pg_control").write_bytes(bytes(ctl))
    assert "not before" in warm.reusable(pool, *args)
