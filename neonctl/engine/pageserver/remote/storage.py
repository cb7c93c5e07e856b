"""Remote storage: where the pageserver offloads timelines so that it can be rebuilt from them alone.

Two backends behind one small interface - a local directory (the default, at
``<project>/remote_storage/``) and an S3 bucket through boto3. Keys are
relative ``/``-separated paths; the backend adds its root or key prefix. Each
object is written whole or not at all (tmp file + fsync + rename locally, a
single PUT or multipart upload on S3), so a reader never sees half a file.

The configuration is a plain dict kept in ``pageserver.json``; an S3 one names a
credentials *file* (mode 0600), never the secrets themselves, so neither the
config nor a log line ever holds them.
"""

from __future__ import annotations

import configparser
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from neonctl.engine.durability import fsync_dir
from neonctl.errors import InvalidInput, RemoteStorageError

DEFAULT_DIR = "remote_storage"  # under the project directory
_COPY_CHUNK = 8 << 20


def check_key(key: str) -> str:
    """Keys are relative paths without empty, `.`-leading or `..` parts (temp files start with a dot)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(not p or p.startswith(".") for p in parts):
        raise RemoteStorageError(f"invalid remote storage key {key!r}")
    return key


class RemoteStorage(ABC):
    """Whole-object upload, download, listing and deletion under relative keys."""

    @abstractmethod
    def upload(self, key: str, source: Path | bytes, length: int | None = None) -> None:
        """Store a local file (its first `length` bytes if given) or a bytes object under key.

        A missing local file raises FileNotFoundError (a local condition the caller may retry);
        remote failures raise RemoteStorageError.
        """

    @abstractmethod
    def download(self, key: str, dest: Path) -> None:
        """Write the object to dest atomically (a temp file next to it, fsynced, renamed)."""

    @abstractmethod
    def list(self, prefix: str = "") -> dict[str, int]:
        """Every key starting with prefix, with its size in bytes."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove the keys; keys that do not exist are fine."""

    @abstractmethod
    def check(self) -> None:
        """Fail with RemoteStorageError unless the storage is reachable and writable."""

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the objects are, as `project set --remote-storage` takes it (no secrets)."""


def _write_atomic(dest: Path, chunks: Iterable[bytes] | Callable[[BinaryIO], object]) -> None:
    """Write chunks (or let a callable write) to a hidden temp file next to dest, fsync it, rename it over
    dest, fsync the directory: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(chunks):
                chunks(f)
            else:
                for chunk in chunks:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def _read_chunks(f, length: int | None):
    left = length
    while left is None or left > 0:
        chunk = f.read(_COPY_CHUNK if left is None else min(_COPY_CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


class LocalFsStorage(RemoteStorage):
    """A directory (possibly another disk or a network mount) that mirrors the key space as files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def url(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def upload(self, key: str, source: Path | bytes, length: int | None = None) -> None:
        dest = self._path(key)
        if isinstance(source, bytes | bytearray | memoryview):
            src = None
        else:
            src = open(source, "rb")  # noqa: SIM115 - a vanished local file raises here, before any remote change
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(dest, [bytes(source)] if src is None else _read_chunks(src, length))
        except OSError as e:
            raise RemoteStorageError(f"cannot write {dest}: {e.strerror or e}") from None
        finally:
            if src is not None:
                src.close()

    def download(self, key: str, dest: Path) -> None:
        path = self._path(key)
        try:
            src = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise RemoteStorageError(f"{self.url}: {key} does not exist") from None
        except OSError as e:
            raise RemoteStorageError(f"cannot read {path}: {e.strerror or e}") from None
        with src:
            _write_atomic(dest, _read_chunks(src, None))

    def list(self, prefix: str = "") -> dict[str, int]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        out: dict[str, int] = {}
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue  # an upload in progress (or one that crashed)
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    try:
                        out[key] = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        pass
        return out

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise RemoteStorageError(f"cannot delete {path}: {e.strerror or e}") from None
            parents.add(path.parent)
        for d in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # prune emptied directories
            while d != self.root and d.is_relative_to(self.root):
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise RemoteStorageError(f"remote storage path {self.root} is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RemoteStorageError(f"cannot create remote storage directory {self.root}: {e.strerror or e}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise RemoteStorageError(f"remote storage directory {self.root} is not writable")


def read_credentials(path: Path) -> dict[str, str]:
    """AWS keys from an INI file (``[default]`` with aws_access_key_id, aws_secret_access_key[, aws_session_token]).

    Refused unless only its owner can read it: a secret readable by others is already leaked.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInput(f"credentials file {path} does not exist") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise InvalidInput(f"credentials file {path} has mode {mode:04o}, it must be 0600 (owner only)",
                           hint=f"chmod 600 {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text(), source=str(path))
    except (configparser.Error, UnicodeDecodeError, OSError):
        raise InvalidInput(f"credentials file {path} is not an INI file with a [default] section") from None
    sections = parser.sections()
    if not sections:
        raise InvalidInput(f"credentials file {path} has no [default] section")
    sec = parser["default" if "default" in sections else sections[0]]
    creds = {k: sec[k].strip() for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
             if sec.get(k, "").strip()}
    if "aws_access_key_id" not in creds or "aws_secret_access_key" not in creds:
        raise InvalidInput(f"credentials file {path} lacks aws_access_key_id or aws_secret_access_key")
    return creds


class S3Storage(RemoteStorage):
    """An S3 bucket (or anything that speaks S3: MinIO, moto) under an optional key prefix."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 credentials_file: str | None = None):
        import boto3  # noqa: PLC0415 - boto3 takes a while to import; only S3 users pay for it
        from botocore.config import Config  # noqa: PLC0415

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        creds = read_credentials(Path(credentials_file)) if credentials_file else {}
        session = boto3.session.Session(region_name=region or "us-east-1", **creds)
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint_url else None)
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def url(self) -> str:
        return describe({"kind": "s3", "bucket": self.bucket, "prefix": self.prefix})

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, what: str, e: Exception) -> RemoteStorageError:
        """A one-line error from a botocore exception (whose text never holds the credentials)."""
        resp = getattr(e, "response", None) or {}
        err = resp.get("Error", {})
        detail = f"{err.get('Code')}: {err.get('Message') or ''}".strip(": ") if err else str(e)
        return RemoteStorageError(f"{self.url}: {what} failed: {detail}")

    def upload(self, key: str, source: Path | bytes, length: int | None = None) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        full = self._key(key)
        try:
            if isinstance(source, bytes | bytearray | memoryview):
                self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(source))
                return
            with open(source, "rb") as f:  # a vanished local file raises here, before any remote change
                if length is not None:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=f.read(length))
                else:
                    self.client.upload_fileobj(f, self.bucket, full)  # multipart for large files
        except (BotoCoreError, ClientError) as e:
            raise self._error(f"upload of {key}", e) from None

    def download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        def fetch(f: BinaryIO) -> None:
            try:
                self.client.download_fileobj(self.bucket, self._key(key), f)
            except ClientError as e:
                if (e.response or {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise RemoteStorageError(f"{self.url}: {key} does not exist") from None
                raise self._error(f"download of {key}", e) from None
            except BotoCoreError as e:
                raise self._error(f"download of {key}", e) from None

        _write_atomic(dest, fetch)

    def list(self, prefix: str = "") -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out[obj["Key"][cut:]] = int(obj["Size"])
        except (BotoCoreError, ClientError) as e:
            raise self._error("listing", e) from None
        return out

    def delete(self, keys: Iterable[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        keys = [self._key(k) for k in keys]
        for i in range(0, len(keys), 1000):
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            except (BotoCoreError, ClientError) as e:
                raise self._error("delete", e) from None
            errors = resp.get("Errors") or []
            if errors:
                raise RemoteStorageError(f"{self.url}: delete of {errors[0].get('Key')} failed:"
                                         f" {errors[0].get('Code')}: {errors[0].get('Message')}")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (BotoCoreError, ClientError) as e:
            raise self._error("access check", e) from None


def parse_url(url: str, endpoint_url: str | None = None, region: str | None = None,
              credentials_file: str | None = None) -> dict:
    """A remote storage config from `local:PATH` or `s3://BUCKET[/PREFIX]` (+ S3 options); nothing is touched."""
    s3_opts = {"--s3-endpoint-url": endpoint_url, "--s3-region": region, "--s3-credentials-file": credentials_file}
    if url.startswith("local:"):
        given = [k for k, v in s3_opts.items() if v is not None]
        if given:
            raise InvalidInput(f"{given[0]} applies only to s3:// remote storage")
        path = url[len("local:"):]
        if not path:
            raise InvalidInput("local remote storage needs a path: local:PATH")
        return {"kind": "local", "path": str(Path(path).expanduser().resolve())}
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not _valid_bucket(bucket):
            raise InvalidInput(f"invalid S3 bucket name {bucket!r} in {url!r}")
        prefix = prefix.strip("/")
        if prefix and any(not p or p in (".", "..") for p in prefix.split("/")):
            raise InvalidInput(f"invalid S3 key prefix {prefix!r} in {url!r}")
        if endpoint_url is not None and not endpoint_url.startswith(("http://", "https://")):
            raise InvalidInput(f"--s3-endpoint-url must be an http:// or https:// URL, not {endpoint_url!r}")
        cfg = {"kind": "s3", "bucket": bucket, "prefix": prefix, "endpoint_url": endpoint_url, "region": region,
               "credentials_file": None}
        if credentials_file is not None:
            path = Path(credentials_file).expanduser().resolve()
            read_credentials(path)  # mode and contents are checked now, not at the pageserver's next start
            cfg["credentials_file"] = str(path)
        return cfg
    raise InvalidInput(f"invalid remote storage URL {url!r}", hint="use local:PATH or s3://BUCKET/PREFIX")


def _valid_bucket(name: str) -> bool:
    return (3 <= len(name) <= 63 and all(c.islower() or c.isdigit() or c in ".-" for c in name)
            and name[0].isalnum() and name[-1].isalnum())


def default_config(project_dir: Path) -> dict:
    return {"kind": "local", "path": str(project_dir / DEFAULT_DIR)}


def open_remote_storage(cfg: dict | None, project_dir: Path) -> RemoteStorage:
    """The backend a config dict names (None: the local directory under the project)."""
    cfg = cfg or default_config(project_dir)
    kind = cfg.get("kind")
    if kind == "local":
        return LocalFsStorage(Path(cfg["path"]))
    if kind == "s3":
        return S3Storage(cfg["bucket"], cfg.get("prefix") or "", cfg.get("endpoint_url"), cfg.get("region"),
                         cfg.get("credentials_file"))
    raise InvalidInput(f"unknown remote storage kind {kind!r} in pageserver.json", hint="local or s3")


def describe(cfg: dict) -> str:
    """The URL form of a config, for display (S3 options other than bucket and prefix are not shown)."""
    if cfg.get("kind") == "s3":
        return f"s3://{cfg['bucket']}/{cfg['prefix']}" if cfg.get("prefix") else f"s3://{cfg['bucket']}"
    return f"local:{cfg.get('path')}"
