"""The pageserver's HTTP API as Python methods: one per route of `service.py`, used by the CLI, the engine,
the explorer and the tests, so no caller spells a URL or a request body.

Errors come back as the NeonctlError subclass the pageserver raised (`engine/client.py`).
"""

from __future__ import annotations

from urllib.parse import urlencode

from neonctl.engine import client


class PageserverClient:
    def __init__(self, address: str):
        self.address = address

    @classmethod
    def of(cls, project) -> PageserverClient:
        return cls(project.pageserver_addr)

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        return client.call("pageserver", self.address, method, path, body, timeout=timeout)

    def status(self, timeout: float = 30.0) -> dict:
        """Every timeline's info (``timelines``: {id: info}) and the pageserver's own state."""
        return self._call("GET", "/v1/status", timeout=timeout)

    def timeline(self, tid: str) -> dict:
        """last_record_lsn, received_lsn, layer_lsn, ancestors, ... of one timeline."""
        return self._call("GET", f"/v1/timeline/{tid}")

    def sync(self, tid: str) -> dict:
        """Make the timeline's ingested WAL durable now; its info, whose last_record_lsn is then durable."""
        return self._call("POST", f"/v1/timeline/{tid}/sync", {})

    def create_branch(self, tid: str, ancestor: str, *, lsn: int | None = None, timestamp_us: int | None = None,
                      wait_for_lsn: int | None = None) -> dict:
        """A new timeline `tid` off `ancestor` at an LSN, a time or (neither) its head."""
        body: dict = {"ancestor_timeline_id": ancestor}
        if wait_for_lsn is not None:
            body["wait_for_lsn"] = wait_for_lsn
        if lsn is not None:
            body["lsn"] = lsn
        if timestamp_us is not None:
            body["timestamp_us"] = timestamp_us
        return self._call("POST", f"/v1/timeline/{tid}/branch", body)

    def delete_timeline(self, tid: str) -> dict:
        return self._call("DELETE", f"/v1/timeline/{tid}")

    def basebackup(self, tid: str, endpoint: str, *, lsn: int | None = None, wait_for_lsn: int | None = None,
                   recycle: bool = False, timeout: float = 60.0) -> dict:
        """Materialise the endpoint's data directory (the pageserver knows where: by name, never a path)."""
        body: dict = {"endpoint": endpoint, "timeout": timeout, "recycle": recycle}
        if lsn is not None:
            body["lsn"] = lsn
        if wait_for_lsn is not None:
            body["wait_for_lsn"] = wait_for_lsn
        return self._call("POST", f"/v1/timeline/{tid}/basebackup", body, timeout=timeout * 2)

    def lsn_by_timestamp(self, tid: str, timestamp_us: int) -> int:
        """The LSN of the last commit at or before a Postgres timestamp."""
        return self._call("GET", f"/v1/timeline/{tid}/lsn_by_timestamp?timestamp_us={timestamp_us}")["lsn"]

    def record_end(self, tid: str, lsn: int) -> int:
        """The end of the last complete record at or before `lsn`."""
        return self._call("GET", f"/v1/timeline/{tid}/record_end?lsn={lsn}")["lsn"]

    def commits(self, tid: str) -> list[list[int]]:
        """(commit end LSN, Postgres commit time) pairs, oldest first."""
        return self._call("GET", f"/v1/timeline/{tid}/commits")["commits"]

    def layers(self, tid: str | None = None) -> list[dict]:
        return self._call("GET", "/v1/layers" + (f"?timeline={tid}" if tid else ""))["layers"]

    def layer_stats(self, tid: str) -> dict:
        return self._call("GET", f"/v1/timeline/{tid}/layer_stats")

    def checkpoint(self, tid: str, *, compact: bool = False, wait_for_lsn: int | None = None,
                   timeout: float = 30.0) -> dict:
        """Freeze the in-memory layer to disk (and compact) once ingest reached `wait_for_lsn`."""
        body: dict = {"compact": compact, "timeout": timeout}
        if wait_for_lsn is not None:
            body["wait_for_lsn"] = wait_for_lsn
        return self._call("POST", f"/v1/timeline/{tid}/checkpoint", body, timeout=timeout + 30)

    def page(self, tid: str, key: str, *, lsn: int | None = None, image: bool = True, timeout: float = 600.0) -> dict:
        """The versions stored for a page key and (with `image`) the page itself at the LSN."""
        q: dict = {"key": key}
        if lsn is not None:
            q["lsn"] = lsn
        if image:
            q["page"] = 1
        return self._call("GET", f"/v1/timeline/{tid}/page?{urlencode(q)}", timeout=timeout)

    def changed_pages(self, tid: str, wait_for_lsn: int | None = None) -> dict:
        """Pages changed on the timeline's own WAL, once the pageserver has it up to `wait_for_lsn`."""
        q = f"?wait_for_lsn={wait_for_lsn}" if wait_for_lsn is not None else ""
        return self._call("GET", f"/v1/timeline/{tid}/changed_pages{q}", timeout=60)

    def create_image(self, tid: str, timeout: float = 600.0) -> dict:
        """An image at the timeline's head now (Conflict when no checkpoint since the newest image)."""
        return self._call("POST", f"/v1/timeline/{tid}/image", {}, timeout=timeout)

    def gc(self, timelines: list[str] | None = None, *, dry_run: bool = False, leases: dict | None = None,
           timeout: float = 600.0) -> list[dict]:
        """Run (or with dry_run, plan) garbage collection; one result per timeline."""
        body: dict = {"dry_run": dry_run}
        if timelines is not None:
            body["timelines"] = timelines
        if leases:
            body["leases"] = leases
        return self._call("POST", "/v1/gc", body, timeout=timeout)["results"]
