"""The redo worker: vanilla Postgres in standby mode as the pageserver's WAL-redo engine.

Neon applies WAL to pages with a patched Postgres; neonctl has only unmodified Postgres, so it
replays whole data directories instead. Image layers keep compute start-up replay short: a
compute built from an image replays WAL from the image's redo point, not from initdb's.

Making the files of an image at LSN I (:func:`build_image` does all of it)
-----------------------------------------------------------------------------
1. Materialise at I: ``Timeline.materialize(I, dir)`` or ``materialize_from_image(older_image,
   ..., I, dir)`` - an older image's files (initdb's at first) + WAL from its redo point up to I
   (I's segment zeroed after I, no later segment) + a ``backup_label``.
2. :func:`replay_to` checks that the label names the checkpoint pg_control names, **removes the
   label**, adds ``standby.signal`` and starts ``postgres`` with ``hot_standby=on``, no
   ``primary_conninfo``/``restore_command``, no ``synchronous_standby_names``, ``fsync=off``, and
   no TCP (a socket in a private 0700 directory with its own pg_hba.conf) - all as command-line
   options, so no configuration file of the directory
   changes and none of it ends up in the image. It polls ``pg_last_wal_replay_lsn()`` until it
   equals I (the standby then waits for WAL that never comes), then ``pg_ctl stop -m fast``.
3. The shutdown *restartpoint* writes every dirty buffer and the SLRUs and records, in pg_control,
   state "shut down in recovery", checkpoint C = the last checkpoint record replayed (C <= I) and
   its redo point R; minRecoveryPoint becomes I. :func:`replay_to` returns ``(C, R, I)``.

Why standby mode and not crash recovery: crash recovery (no signal file) ends by writing an
end-of-recovery checkpoint record at I - WAL that is not in the timeline's history, so the
directory would not match any LSN of it. A standby never writes WAL.

Why the backup_label must go (measured, PG 18 and PG 15): in archive recovery with a label whose
backup has no known end (``BACKUP METHOD: pg_rewind``), replaying a *shutdown* checkpoint record
PANICs: "online backup was canceled, recovery cannot continue". Every compute stop writes one and
so does every compute start (its end-of-recovery checkpoint), so with the label the redo worker
fails on almost any real history. Without it a standby starts from pg_control's checkpoint - the
same one (checked), as for any standby made from a cleanly stopped copy - and needs no label: a
signal file forces recovery, so the "clean base skips all redo" trap of crash recovery does not
apply. A "shut down in recovery" base is an ordinary standby restart (consistent at its
minRecoveryPoint).

What such a directory is good for (tests/integration/test_redo_worker.py, both versions): its pages are those
of some state between R and I, so with WAL R..X for a record end X >= I (zeroed after X, nothing
later) and a ``backup_label`` naming C/R, Postgres crash-recovers to exactly X ("redo starts at R",
"invalid record length at X") with exactly the data committed at X, on Postgres timeline 1, also
across shutdown checkpoints (crash recovery does not PANIC on them). Both label forms work for
X >= I: ``BACKUP METHOD: pg_rewind`` as ``Timeline.materialize`` writes it, and ``BACKUP METHOD:
streamed`` + ``BACKUP FROM: standby``, which ``image_materialize`` uses by default because then
Postgres takes the backup's end from minRecoveryPoint (= I) and itself refuses X < I ("WAL ends
before end of online backup"). X < I must be refused - ``materialize_from_image`` does: pages may
hold changes made after X. With a pg_rewind label PG 15 comes up anyway, with rows of
transactions after X on disk whose xids it will hand out again (silent corruption).

Limits:
- The restartpoint is skipped when no checkpoint record was replayed after the starting one
  ("skipping restartpoint, already performed"): buffers are *not* flushed and pg_control keeps the
  old checkpoint (state "shut down in recovery", minRecoveryPoint I). The result is still correct
  - recovery replays from the old R - just not shorter; :func:`build_image` reports it
  (``ImageInfo.redo_lsn`` equals the base's) and callers should pick I after a checkpoint.
- ``lsn`` must be a record end (``last_record_lsn``, ``record_end_at_or_before``): the replay
  position is compared for equality.
- Hot standby needs ``max_connections`` etc. at least as large as the primary's; they are taken
  from pg_control. A later increase on the primary pauses replay: that surfaces as a timeout
  whose message quotes the server log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from neonctl.engine.compute import postmaster
from neonctl.engine.compute.controldata import read_control_data
from neonctl.engine.compute.runtime import PgRuntime
from neonctl.engine.lsn import format_lsn, parse_lsn
from neonctl.engine.ports import ephemeral_port
from neonctl.engine.process import log_tail, pid_alive
from neonctl.errors import InvalidInput, PostgresError, Timeout

# pg_controldata label -> GUC. A hot standby refuses to run with less than the primary had.
_HOT_STANDBY_MINIMA = {
    "max_connections setting": ("max_connections", 100),
    "max_worker_processes setting": ("max_worker_processes", 8),
    "max_wal_senders setting": ("max_wal_senders", 10),
    "max_prepared_xacts setting": ("max_prepared_transactions", 0),
    "max_locks_per_xact setting": ("max_locks_per_transaction", 64),
}

SHUT_DOWN_IN_RECOVERY = "shut down in recovery"


class RedoResult(NamedTuple):
    """pg_control after a standby replayed to ``lsn``: a restart needs WAL from ``redo_lsn``."""

    checkpoint_lsn: int  # C: the last checkpoint record replayed (the restartpoint)
    redo_lsn: int  # R: its redo point
    lsn: int  # I: every page is at or before this LSN; the directory is usable for X >= I only


def _standby_options(runtime: PgRuntime, pgdata: Path, port: int, socket_dir: Path) -> list[str]:
    raw = read_control_data(runtime.bin_dir, pgdata).raw
    settings = {
        "hot_standby": "on",
        # No TCP at all: the worker is reached through a socket in a 0700 directory of its own, so no other
        # local user can connect to it, whatever the image's pg_hba.conf says (hba_file is ours too).
        "listen_addresses": "",
        "port": str(port),
        "unix_socket_directories": str(socket_dir),
        "hba_file": str(socket_dir / "pg_hba.conf"),
        "fsync": "off",
        "synchronous_commit": "off",
        "synchronous_standby_names": "",
        "primary_conninfo": "",
        "primary_slot_name": "",
        "restore_command": "",
        "archive_mode": "off",
        "recovery_target_timeline": "latest",
        "recovery_init_sync_method": "syncfs",
        "hot_standby_feedback": "off",
        "shared_preload_libraries": "",
        "logging_collector": "off",
        "log_line_prefix": "%m [%p] ",
    }
    for label, (guc, default) in _HOT_STANDBY_MINIMA.items():
        try:
            settings[guc] = str(max(default, int(raw[label])))
        except (KeyError, ValueError):
            settings[guc] = str(default)
    out: list[str] = []
    for k, v in settings.items():
        out += ["-c", f"{k}={v}"]
    return out


def _parse_backup_label(text: str) -> tuple[int, int]:
    """(checkpoint, redo) named by a backup_label."""
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    try:
        return parse_lsn(fields["CHECKPOINT LOCATION"]), parse_lsn(fields["START WAL LOCATION"].split()[0])
    except (KeyError, IndexError, InvalidInput) as e:
        raise InvalidInput(f"unreadable backup_label: {e}") from e


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _replay_lsn(socket_dir: Path, port: int, user: str) -> tuple[int, bool] | None:
    """(pg_last_wal_replay_lsn, in recovery) or None while the standby does not accept connections."""
    import psycopg

    try:
        with psycopg.connect(host=str(socket_dir), port=port, user=user, dbname="postgres",
                             connect_timeout=3, autocommit=True) as conn:
            lsn, in_recovery = conn.execute(
                "SELECT coalesce(pg_last_wal_replay_lsn() - '0/0'::pg_lsn, 0), pg_is_in_recovery()").fetchone()
    except psycopg.OperationalError:
        return None
    return int(lsn), bool(in_recovery)


def _stop(runtime: PgRuntime, pgdata: Path, proc: subprocess.Popen, mode: str, timeout: float) -> None:
    try:
        postmaster.stop(pgdata, mode, timeout=timeout)
    except Timeout as e:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise PostgresError(f"the redo worker's Postgres did not stop: {e}") from None
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def replay_to(runtime: PgRuntime, pgdata: Path, lsn: int, *, timeout: float = 300.0,
              log_file: Path | None = None, user: str = "postgres") -> RedoResult:
    """Replay a materialised directory to ``lsn`` as a standby and shut it down in recovery.

    ``pgdata`` must hold exactly the WAL up to ``lsn`` (``Timeline.materialize(lsn, pgdata)`` or
    ``materialize_from_image``) and be reachable by the user that runs Postgres; it is chowned to
    that user. On success the directory is in state "shut down in recovery", without signal
    files, ready for ``image_create.create_image``. On failure Postgres is stopped and the error
    quotes its log; the directory is then garbage.
    """
    pgdata = Path(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        raise InvalidInput(f"{pgdata} is not a data directory")
    if not (pgdata / "backup_label").exists():
        raise InvalidInput(f"{pgdata} has no backup_label: materialise it at the LSN first",
                           hint="without one a clean base would skip all redo")
    if _postmaster_pid(pgdata):
        raise InvalidInput(f"a postmaster is already running on {pgdata}")
    label = _parse_backup_label((pgdata / "backup_label").read_text())
    cd = read_control_data(runtime.bin_dir, pgdata)
    if cd.state not in ("shut down", SHUT_DOWN_IN_RECOVERY):
        raise InvalidInput(f"{pgdata} is in state {cd.state!r}: the redo worker needs a cleanly stopped base")
    if lsn < cd.checkpoint_lsn:
        raise InvalidInput(f"{format_lsn(lsn)} is before the checkpoint {format_lsn(cd.checkpoint_lsn)} of {pgdata}")
    if label != (cd.checkpoint_lsn, cd.redo_lsn):
        raise InvalidInput(f"{pgdata}: backup_label names checkpoint {format_lsn(label[0])}, pg_control"
                           f" {format_lsn(cd.checkpoint_lsn)}: a standby would start from the wrong one")
    log_file = Path(log_file) if log_file else pgdata.with_name(pgdata.name + ".redo.log")
    # In standby mode the label is redundant (pg_control names the same checkpoint, checked above)
    # and harmful: replaying a shutdown checkpoint while a label's backup is "in progress" PANICs.
    for name in ("backup_label", "backup_label.old", "tablespace_map", "recovery.signal", "postmaster.pid"):
        (pgdata / name).unlink(missing_ok=True)
    (pgdata / "standby.signal").write_bytes(b"")
    os.chmod(pgdata / "standby.signal", 0o600)
    runtime.chown(pgdata, recursive=True)
    deadline = time.monotonic() + timeout
    with _private_socket_dir(runtime) as socket_dir:
        return _run_standby(runtime, pgdata, lsn, socket_dir, deadline, log_file, user)


@contextmanager
def _private_socket_dir(runtime: PgRuntime) -> Iterator[Path]:
    """A 0700 directory (short: a socket path has ~100 bytes) holding the worker's socket and pg_hba.conf."""
    d = Path(tempfile.mkdtemp(prefix="neonctl-redo-"))
    try:
        (d / "pg_hba.conf").write_text("local all all trust\n")
        runtime.chown(d, recursive=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run_standby(runtime: PgRuntime, pgdata: Path, lsn: int, socket_dir: Path, deadline: float, log_file: Path,
                 user: str) -> RedoResult:
    proc = None
    for _attempt in range(5):
        port = ephemeral_port()
        with open(log_file, "ab") as log:
            if runtime.run_as is not None:
                runtime.chown(log_file)
            proc = subprocess.Popen(
                [runtime.bin("postgres"), "-D", str(pgdata), *_standby_options(runtime, pgdata, port, socket_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, **runtime.popen_kwargs())
        try:
            result = _wait_for_replay(proc, socket_dir, port, lsn, deadline, log_file, user)
        except BaseException:
            if proc.poll() is None:
                try:
                    _stop(runtime, pgdata, proc, "immediate", 30)
                except (PostgresError, subprocess.TimeoutExpired):
                    pass
            raise
        if result == "port-taken":
            continue
        break
    else:
        raise PostgresError(f"the redo worker found no free port: {log_tail(log_file)}", hint=str(log_file))
    assert proc is not None
    _stop(runtime, pgdata, proc, "fast", max(30.0, deadline - time.monotonic()))
    (pgdata / "standby.signal").unlink(missing_ok=True)
    cd = read_control_data(runtime.bin_dir, pgdata)
    if cd.state != SHUT_DOWN_IN_RECOVERY:
        raise PostgresError(f"redo worker left {pgdata} in state {cd.state!r}, expected {SHUT_DOWN_IN_RECOVERY!r}",
                            hint=str(log_file))
    if not cd.redo_lsn <= cd.checkpoint_lsn <= lsn:
        raise PostgresError(f"redo worker: checkpoint {format_lsn(cd.checkpoint_lsn)} / redo"
                            f" {format_lsn(cd.redo_lsn)} are not at or before {format_lsn(lsn)}")
    return RedoResult(cd.checkpoint_lsn, cd.redo_lsn, lsn)


def _wait_for_replay(proc: subprocess.Popen, socket_dir: Path, port: int, lsn: int, deadline: float,
                     log_file: Path, user: str) -> str:
    last = None
    while True:
        if proc.poll() is not None:
            tail = log_tail(log_file, 6)
            if "could not create any Unix-domain sockets" in tail or "Address already in use" in tail:
                return "port-taken"
            raise PostgresError(f"the redo worker's Postgres exited (code {proc.returncode}) before replaying"
                                f" to {format_lsn(lsn)}: {log_tail(log_file, 3)}", hint=str(log_file))
        state = _replay_lsn(socket_dir, port, user)
        if state is not None:
            replayed, in_recovery = state
            if not in_recovery:
                raise PostgresError("the redo worker's Postgres left recovery: it must stay a standby",
                                    hint=str(log_file))
            last = replayed
            if replayed == lsn:
                return "ok"
            if replayed > lsn:
                raise PostgresError(f"the redo worker replayed to {format_lsn(replayed)}, past its target"
                                    f" {format_lsn(lsn)}: the WAL was not cut at the target", hint=str(log_file))
        if time.monotonic() > deadline:
            where = "never accepted a connection" if last is None else f"replayed only to {format_lsn(last)}"
            raise Timeout(f"the redo worker did not reach {format_lsn(lsn)}: it {where}; log: {log_tail(log_file, 3)}",
                          hint=str(log_file))
        time.sleep(0.02 if last is None else 0.05)


__all__ = ["SHUT_DOWN_IN_RECOVERY", "RedoResult", "replay_to"]
