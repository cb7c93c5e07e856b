"""Remote storage: both backends (a directory; S3 on a real moto server), the offload order, and a pageserver
rebuilt from the remote alone after its disk was lost."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import connect
from waiting import wait_until

from neonctl.cli import main as cli_main
from neonctl.engine.lifecycle import delete_project
from neonctl.engine.lsn import segment_file_name
from neonctl.engine.pageserver.client import PageserverClient
from neonctl.engine.pageserver.commit_log import CommitLog
from neonctl.engine.pageserver.remote.download import restore_timelines
from neonctl.engine.pageserver.remote.storage import (
    LocalFsStorage,
    S3Storage,
    parse_url,
)
from neonctl.engine.pageserver.remote.upload import RemoteSync, remote_timelines
from neonctl.engine.pageserver.timeline.timeline import Timeline
from neonctl.engine.ports import ephemeral_port
from neonctl.engine.project import load_project
from neonctl.engine.safekeeper.client import flush_lsn as _sk_flush
from neonctl.errors import CorruptData, InvalidInput, RemoteStorageError

SMALL = {"checkpoint_distance": 256 * 1024, "checkpoint_timeout": 3600, "compaction_threshold": 3,
         "compaction_target_size": 512 * 1024, "gc_period": 0}
SECRET = "s3cr3t-k3y-that-must-never-leak"


# -- a real S3 (moto) on loopback ---------------------------------------------------------------------------------


class S3Server:
    def __init__(self, endpoint: str, credentials: Path, bucket: str):
        self.endpoint, self.credentials, self.bucket = endpoint, credentials, bucket

    def storage(self, prefix: str = "") -> S3Storage:
        return S3Storage(self.bucket, prefix, self.endpoint, "us-east-1", str(self.credentials))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = ephemeral_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            assert proc.poll() is None, "moto_server exited"
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()  # OSError: not yet
            return True

        wait_until(listening, 20, "moto_server to listen")
        creds = tmp_path_factory.mktemp("s3") / "credentials"
        creds.write_text(f"[default]\naws_access_key_id = testing\naws_secret_access_key = {SECRET}\n")
        creds.chmod(0o600)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key=SECRET).create_bucket(Bucket="neonctl-test")
        yield S3Server(endpoint, creds, "neonctl-test")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalFsStorage(tmp_path / "remote")
    return request.getfixturevalue("s3").storage(prefix=f"unit/{tmp_path.name}")


# -- backends -------------------------------------------------------------------------------------------------------


def test_backend_upload_list_download_delete(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    storage.upload("timelines/a/wal/seg", src)
    storage.upload("timelines/a/wal/part", src, length=1000)  # the first bytes only (a partial WAL segment)
    storage.upload("timelines/a/metadata.json", b'{"x": 1}')
    storage.upload("timelines/b/metadata.json", b"{}")
    assert storage.list("timelines/a/") == {"timelines/a/wal/seg": 100_000, "timelines/a/wal/part": 1000,
                                            "timelines/a/metadata.json": 8}
    assert set(storage.list()) == {"timelines/a/wal/seg", "timelines/a/wal/part", "timelines/a/metadata.json",
                                   "timelines/b/metadata.json"}
    dest = tmp_path / "out" / "seg"
    dest.parent.mkdir()
    storage.download("timelines/a/wal/seg", dest)
    assert dest.read_bytes() == src.read_bytes()
    storage.download("timelines/a/wal/part", dest)  # replaces atomically
    assert dest.read_bytes() == src.read_bytes()[:1000]
    assert os.listdir(dest.parent) == ["seg"]  # no temp file left behind
    storage.upload("timelines/a/metadata.json", b'{"x": 2}')  # overwrite
    storage.download("timelines/a/metadata.json", dest)
    assert dest.read_bytes() == b'{"x": 2}'
    storage.delete(["timelines/a/wal/seg", "timelines/a/wal/part", "timelines/a/nothing"])
    assert set(storage.list("timelines/")) == {"timelines/a/metadata.json", "timelines/b/metadata.json"}
    with pytest.raises(RemoteStorageError, match="does not exist"):
        storage.download("timelines/a/wal/seg", dest)
    assert dest.read_bytes() == b'{"x": 2}'  # a failed download leaves the old file alone
    with pytest.raises(FileNotFoundError):  # a vanished local file: nothing is written remotely
        storage.upload("timelines/c/x", tmp_path / "missing")
    assert storage.list("timelines/c/") == {}
    for bad in ("", "/abs", "a/../b", "a//b", "a/.hidden"):
        with pytest.raises(RemoteStorageError, match="invalid remote storage key"):
            storage.upload(bad, b"x")
    storage.check()


def test_local_backend_is_a_plain_directory(tmp_path):
    st = LocalFsStorage(tmp_path / "remote")
    st.upload("timelines/a/layers/x", b"data")
    assert (tmp_path / "remote" / "timelines" / "a" / "layers" / "x").read_bytes() == b"data"
    (tmp_path / "remote" / "timelines" / "a" / "layers" / ".x.crashed-upload").write_bytes(b"half")
    assert st.list() == {"timelines/a/layers/x": 4}  # temp files of uploads in flight are not objects
    (tmp_path / "remote" / "timelines" / "a" / "layers" / ".x.crashed-upload").unlink()
    st.delete(["timelines/a/layers/x"])
    assert not (tmp_path / "remote" / "timelines").exists()  # emptied directories are pruned
    (tmp_path / "file").write_text("")
    with pytest.raises(RemoteStorageError, match="not a directory"):
        LocalFsStorage(tmp_path / "file").check()


def test_s3_credentials_must_be_private_and_stay_out_of_the_config(s3, tmp_path):
    loose = tmp_path / "creds"
    loose.write_text(s3.credentials.read_text())
    loose.chmod(0o644)
    with pytest.raises(InvalidInput, match="mode 0644, it must be 0600"):
        S3Storage(s3.bucket, "", s3.endpoint, None, str(loose))
    with pytest.raises(InvalidInput, match="mode 0644"):
        parse_url(f"s3://{s3.bucket}/p", s3.endpoint, None, str(loose))
    cfg = parse_url(f"s3://{s3.bucket}/some/prefix/", s3.endpoint, "eu-west-1", str(s3.credentials))
    assert cfg == {"kind": "s3", "bucket": s3.bucket, "prefix": "some/prefix", "endpoint_url": s3.endpoint,
                   "region": "eu-west-1", "credentials_file": str(s3.credentials)}
    assert SECRET not in json.dumps(cfg)
    with pytest.raises(RemoteStorageError, match="NoSuchBucket"):
        S3Storage("no-such-bucket", "", s3.endpoint, None, str(s3.credentials)).check()


# -- a project offloading to remote storage -------------------------------------------------------------------------


def _project(name: str, *set_args: str):
    assert cli_main(["init", "--name", name, "-o", "json"]) == 0
    p = load_project(name)
    (p.dir / "pageserver" / "pageserver.json").write_text(json.dumps(SMALL))
    if set_args:
        assert cli_main(["project", "set", "-p", name, *set_args, "-o", "json"]) == 0
    assert cli_main(["start", "-p", name, "-o", "json"]) == 0
    yield p
    delete_project(p)


@pytest.fixture(scope="module")
def local_project():
    yield from _project("remote-local")


@pytest.fixture(scope="module")
def s3_project(s3):
    yield from _project("remote-s3", "--remote-storage", f"s3://{s3.bucket}/projects/remote-s3",
                        "--s3-endpoint-url", s3.endpoint, "--s3-region", "us-east-1",
                        "--s3-credentials-file", str(s3.credentials))


def _tl(p) -> str:
    return p.branch("main").timeline_id


def _remote_lsn(p):
    return PageserverClient(p.pageserver_addr).timeline(_tl(p))["remote_consistent_lsn"]


def _wait_offloaded(p, timeout: float = 45) -> int:
    """Until the remote holds everything the safekeepers had flushed when we started waiting."""
    target = _sk_flush(p, _tl(p))
    wait_until(lambda: (_remote_lsn(p) or 0) >= target, timeout, f"remote_consistent_lsn to reach {target}",
               interval=0.2)
    return target


def _rows(p) -> list[tuple]:
    with connect(p) as conn:
        return conn.execute("SELECT id, v FROM offloaded ORDER BY id").fetchall()


@pytest.mark.parametrize("which", ["local_project", "s3_project"])
def test_pageserver_is_rebuilt_from_remote_storage(which, request, cli):
    p = request.getfixturevalue(which)
    cli("endpoint", "start", "main", "-p", p.name, "-o", "json")
    with connect(p) as conn:
        conn.execute("DROP TABLE IF EXISTS offloaded")
        conn.execute("CREATE TABLE offloaded (id int PRIMARY KEY, v text)")
        for i in range(8):  # a few MB of WAL: L0s, compactions (remote deletions), a full WAL segment or so
            conn.execute("INSERT INTO offloaded SELECT g, md5(g::text) FROM generate_series(%s::int, %s::int) g",
                         (i * 5000 + 1, (i + 1) * 5000))
    before = _rows(p)
    assert len(before) == 40_000
    target = _wait_offloaded(p)
    _, out, _ = cli("status", "-p", p.name, "-o", "json")
    ps = next(d for d in json.loads(out)["daemons"] if d["name"] == "pageserver")
    assert ps["timelines"][_tl(p)]["remote_consistent_lsn"] >= target
    cli("endpoint", "stop", "main", "-p", p.name, "-o", "json")
    cli("stop", "-p", p.name, "-o", "json")
    commits = CommitLog(p.dir / "pageserver" / "timelines" / _tl(p) / "commits.bin").entries()

    shutil.rmtree(p.dir / "pageserver" / "timelines")  # the pageserver's disk is lost
    cli("start", "-p", p.name, "-o", "json")
    log = (p.dir / "pageserver" / "pageserver.log").read_text()
    assert f"restored timeline {_tl(p)}" in log
    assert SECRET not in log and SECRET not in (p.dir / "pageserver" / "pageserver.json").read_text()
    # the commit log (time -> LSN) is rebuilt from the WAL: every commit the WAL still holds is back
    rebuilt = CommitLog(p.dir / "pageserver" / "timelines" / _tl(p) / "commits.bin").entries()
    assert rebuilt and set(rebuilt) <= set(commits) and rebuilt[-1] == commits[-1]
    cli("endpoint", "start", "main", "-p", p.name, "-o", "json")
    assert _rows(p) == before
    cli("endpoint", "stop", "main", "-p", p.name, "-o", "json")


def test_upload_order_is_durability_order(local_project, cli, tmp_path):
    """Immutable files first, then the partial segment and metadata, the index last, deletions after it."""
    p = local_project
    cli("stop", "-p", p.name, "-o", "json")
    try:
        shutil.copytree(p.dir / "pageserver" / "timelines" / _tl(p), tmp_path / _tl(p))
    finally:
        cli("start", "-p", p.name, "-o", "json")
    tl = Timeline(tmp_path / _tl(p))
    ops: list[tuple[str, str]] = []

    class Recording(LocalFsStorage):
        def upload(self, key, source, length=None):
            super().upload(key, source, length)
            ops.append(("upload", key.split("/", 2)[2]))

        def delete(self, keys):
            keys = list(keys)
            super().delete(keys)
            ops.extend(("delete", k.split("/", 2)[2]) for k in keys)

    remote = Recording(tmp_path / "remote")
    assert RemoteSync(remote, lambda: [tl]).sync_timeline(tl) == tl.last_record_lsn
    seg = tl.meta.wal_seg_size
    partial = f"wal/{segment_file_name(tl.last_record_lsn // seg, seg_size=seg)}"
    keys = [k for _, k in ops]
    assert keys[-2:] == ["metadata.json", "layers/index_part.json"]
    immutable = [i for i, k in enumerate(keys) if k.startswith("layers/") and k != "layers/index_part.json"
                 or k.startswith("wal/") and k != partial]
    assert immutable and max(immutable) < keys.index(partial) < keys.index("metadata.json")
    assert "commits.bin" not in keys  # rebuilt from the WAL on restore
    assert remote.list()[f"timelines/{_tl(p)}/{partial}"] == tl.last_record_lsn % seg  # cut where the WAL ends

    # a restarted uploader finds the immutable files there and sends only what it cannot know
    ops.clear()
    sync = RemoteSync(remote, lambda: [tl])
    sync.sync_timeline(tl)
    assert [k for _, k in ops] == ["metadata.json", "layers/index_part.json"]
    ops.clear()
    sync.sync_timeline(tl)
    assert ops == []  # nothing changed, nothing sent

    # compaction or GC dropped a layer: the new index goes up before the file goes away
    index = json.loads((tl.dir / "layers" / "index_part.json").read_text())
    gone = index["layers"].pop()["name"]
    (tl.dir / "layers" / "index_part.json").write_text(json.dumps(index))
    (tl.dir / "layers" / gone).unlink()
    sync.sync_timeline(tl)
    assert ops == [("upload", "layers/index_part.json"), ("delete", f"layers/{gone}")]

    # a file of the snapshot vanishing mid-round (compaction) aborts the round before the commit point
    fresh = Recording(tmp_path / "fresh")
    ops.clear()
    victim = index["layers"][0]["name"]
    (tl.dir / "layers" / victim).rename(tmp_path / victim)
    again = Timeline(tmp_path / _tl(p))
    RemoteSync(fresh, lambda: [again]).sync_all()
    assert again.remote_consistent_lsn is None
    assert "layers/index_part.json" not in [k for _, k in ops] and "metadata.json" not in [k for _, k in ops]


def test_restore_verifies_layers_and_installs_whole_timelines(local_project, tmp_path):
    p = local_project
    _wait_offloaded(p)
    copy = tmp_path / "remote" / "timelines" / _tl(p)
    for _ in range(10):  # the uploader is live: take a copy whose index lists only files it holds
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(p.dir / "remote_storage" / "timelines" / _tl(p), copy)
        listed = json.loads((copy / "layers" / "index_part.json").read_text())["layers"]
        if all((copy / "layers" / d["name"]).exists() for d in listed):
            break
        time.sleep(0.5)
    files = remote_timelines(LocalFsStorage(tmp_path / "remote"))[_tl(p)]
    workdir = tmp_path / "ps"
    workdir.mkdir()
    assert restore_timelines(workdir, LocalFsStorage(tmp_path / "remote")) == [_tl(p)]
    restored = workdir / "timelines" / _tl(p)
    assert json.loads((restored / "layers" / "index_part.json").read_text()) == json.loads(
        (copy / "layers" / "index_part.json").read_text())
    assert {f.name for f in (restored / "wal").iterdir()} == {k[4:] for k in files if k.startswith("wal/")}
    assert all(f.stat().st_size == 16 << 20 for f in (restored / "wal").iterdir())  # partial one padded
    assert not (workdir / "restore.tmp").exists()
    assert restore_timelines(workdir, LocalFsStorage(tmp_path / "remote")) == []  # present locally: left alone

    # one flipped bit in a layer's first value: a clear error naming the layer, nothing installed
    shutil.rmtree(workdir / "timelines")
    layer = json.loads((copy / "layers" / "index_part.json").read_text())["layers"][0]["name"]
    with open(copy / "layers" / layer, "r+b") as f:
        f.seek(8192 + 1)
        b = f.read(1)
        f.seek(8192 + 1)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(CorruptData, match=f"remote layer timelines/{_tl(p)}/layers/{layer} is damaged"):
        restore_timelines(workdir, LocalFsStorage(tmp_path / "remote"))
    assert not (workdir / "timelines" / _tl(p)).exists()


# -- bad input ------------------------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_remote_storage_settings_change_nothing(local_project, cli, tmp_path, s3):
    p = local_project
    cfg = p.dir / "pageserver" / "pageserver.json"
    before = cfg.read_text()
    loose = tmp_path / "creds"
    loose.write_text(s3.credentials.read_text())
    loose.chmod(0o644)
    cases = [
        (["--remote-storage", "ftp://host/x"], 2, "invalid remote storage URL 'ftp://host/x'"),
        (["--remote-storage", "s3://B/x"], 2, "invalid S3 bucket name"),
        (["--remote-storage", "local:"], 2, "needs a path"),
        (["--remote-storage", f"s3://{s3.bucket}/x", "--s3-endpoint-url", s3.endpoint,
          "--s3-credentials-file", str(loose)], 2, "has mode 0644, it must be 0600"),
        (["--remote-storage", f"s3://{s3.bucket}/x", "--s3-credentials-file", str(tmp_path / "none")], 2,
         "does not exist"),
        (["--remote-storage", f"local:{tmp_path}/r", "--s3-region", "x"], 2, "applies only to s3://"),
        (["--s3-region", "eu-west-1"], 2, "go with --remote-storage"),
        (["--remote-storage", f"local:{tmp_path}/r"], 1, "stop the project's daemons first"),  # it is running
    ]
    cli("start", "-p", p.name, "-o", "json")
    for args, code, msg in cases:
        rc, _, err = cli("project", "set", "-p", p.name, *args, ok=False)
        assert rc == code and msg in _one_line(err), (args, err)
        assert cfg.read_text() == before
    assert not (tmp_path / "r").exists()
    _, out, _ = cli("project", "get", "-p", p.name, "-o", "json")
    assert json.loads(out)["remote_storage"] == f"local:{p.dir / 'remote_storage'}"


def test_pageserver_config_keeps_numeric_set_and_the_remote_storage_field(tmp_path):
    from neonctl.engine.pageserver.config import PageserverConfig

    cfg = PageserverConfig()
    cfg.set("checkpoint_distance", "1024")
    cfg.set("pitr_interval", "2.5")
    assert (cfg.checkpoint_distance, cfg.pitr_interval) == (1024, 2.5)
    with pytest.raises(InvalidInput, match="not a numeric setting"):
        cfg.set("remote_storage", "local:/x")
    cfg.remote_storage = parse_url(f"local:{tmp_path}/r")
    cfg.save(tmp_path)
    again = PageserverConfig.load(tmp_path)
    assert again.remote_storage == {"kind": "local", "path": str(tmp_path / "r")} and again.checkpoint_distance == 1024


def test_project_delete_removes_only_its_own_timelines_from_remote_storage(s3, cli):
    """Two projects may share a bucket prefix: deleting one leaves the other's timelines alone."""
    prefix = "shared-prefix"
    foreign = S3Storage(s3.bucket, prefix, s3.endpoint, None, str(s3.credentials))
    foreign.upload("timelines/00000000000000000000000000000abc/metadata.json", b"{}")  # someone else's
    gen = _project("remote-del", "--remote-storage", f"s3://{s3.bucket}/{prefix}", "--s3-endpoint-url", s3.endpoint,
                   "--s3-credentials-file", str(s3.credentials))
    p = next(gen)
    tid = _tl(p)
    cli("stop", "-p", p.name, "-o", "json")  # a clean stop commits the timeline to the remote
    assert f"timelines/{tid}/layers/index_part.json" in foreign.list()

    # an unreachable remote: the deletion fails with one line and the project stays
    cfg_path = p.dir / "pageserver" / "pageserver.json"
    good = cfg_path.read_text()
    broken = json.loads(good)
    broken["remote_storage"]["endpoint_url"] = f"http://127.0.0.1:{ephemeral_port()}"
    cfg_path.write_text(json.dumps(broken))
    rc, _, err = cli("project", "delete", p.name, ok=False)
    assert rc != 0 and "cannot delete the project's timelines from" in _one_line(err)
    assert p.dir.exists() and f"timelines/{tid}/metadata.json" in foreign.list()
    cfg_path.write_text(good)

    _, out, _ = cli("project", "delete", p.name, "-o", "json")
    assert json.loads(out)["remote_timelines_deleted"] == 1
    assert not p.dir.exists()
    assert set(foreign.list()) == {"timelines/00000000000000000000000000000abc/metadata.json"}
    gen.close()  # the fixture generator's own delete_project would find nothing left: not run


def test_project_delete_keep_remote_leaves_the_timelines(tmp_path, cli):
    remote = tmp_path / "kept"
    gen = _project("remote-keep", "--remote-storage", f"local:{remote}")
    p = next(gen)
    tid = _tl(p)
    cli("stop", "-p", p.name, "-o", "json")
    _, out, _ = cli("project", "delete", p.name, "--keep-remote", "-o", "json")
    assert "remote_timelines_deleted" not in json.loads(out)
    assert (remote / "timelines" / tid / "layers" / "index_part.json").exists()
    gen.close()


def test_a_stale_local_disk_is_replaced_by_the_newer_remote_copy(local_project, cli, tmp_path):
    """An old copy of the pageserver's disk put back must not overwrite the remote's newer index."""
    p = local_project
    tl_dir = p.dir / "pageserver" / "timelines" / _tl(p)
    cli("endpoint", "start", "main", "-p", p.name, "-o", "json")
    with connect(p) as conn:
        conn.execute("DROP TABLE IF EXISTS stale_test")
        conn.execute("CREATE TABLE stale_test (id int PRIMARY KEY)")
        conn.execute("INSERT INTO stale_test SELECT generate_series(1, 1000)")
    cli("endpoint", "stop", "main", "-p", p.name, "-o", "json")
    cli("stop", "-p", p.name, "-o", "json")
    shutil.copytree(tl_dir, tmp_path / "old")  # a backup of the pageserver's disk
    old_lsn = json.loads((tmp_path / "old" / "metadata.json").read_text())["last_record_lsn"]

    cli("start", "-p", p.name, "-o", "json")
    cli("endpoint", "start", "main", "-p", p.name, "-o", "json")
    with connect(p) as conn:
        for i in range(6):  # a few MB: layers frozen and compacted after the backup
            conn.execute("INSERT INTO stale_test SELECT g FROM generate_series(%s::int, %s::int) g",
                         (1001 + i * 20000, 1000 + (i + 1) * 20000))
    cli("endpoint", "stop", "main", "-p", p.name, "-o", "json")
    target = _wait_offloaded(p)
    assert target > old_lsn
    cli("stop", "-p", p.name, "-o", "json")

    shutil.rmtree(tl_dir)
    shutil.copytree(tmp_path / "old", tl_dir)  # the backup is put back
    cli("start", "-p", p.name, "-o", "json")
    log = (p.dir / "pageserver" / "pageserver.log").read_text()
    assert "the local disk is stale; replacing it with the remote copy" in log
    assert f"restored timeline {_tl(p)}" in log
    assert json.loads((tl_dir / "metadata.json").read_text())["last_record_lsn"] >= target
    cli("endpoint", "start", "main", "-p", p.name, "-o", "json")
    with connect(p) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM stale_test").fetchone() == (121_000, 121_000)
    cli("endpoint", "stop", "main", "-p", p.name, "-o", "json")
    # a current local copy is left alone at the next start
    cli("stop", "-p", p.name, "-o", "json")
    cli("start", "-p", p.name, "-o", "json")
    log = (p.dir / "pageserver" / "pageserver.log").read_text()
    assert log.count("the local disk is stale") == 1
