"""A safekeeper's HTTP API as Python methods: one per route of `service.py` that neonctl's own code calls
(the WAL route is read by pageservers and peers over their own async connections).

Errors come back as the NeonctlError subclass the safekeeper raised (`engine/client.py`).
"""

from __future__ import annotations

from neonctl.engine import client


class SafekeeperClient:
    def __init__(self, sk_id: int, address: str):
        self.id = sk_id
        self.address = address
        self.name = f"sk{sk_id}"

    @classmethod
    def all_of(cls, project) -> dict[int, SafekeeperClient]:
        """A client per configured safekeeper, by id."""
        return {i: cls(i, a) for i, a in project.safekeeper_addrs().items()}

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        return client.call(self.name, self.address, method, path, body, timeout=timeout)

    def status(self, timeout: float = 30.0) -> dict:
        return self._call("GET", "/v1/status", timeout=timeout)

    def timeline(self, tid: str, timeout: float = 30.0) -> dict:
        """flush_lsn, commit_lsn, term, compute, ... of one timeline."""
        return self._call("GET", f"/v1/timeline/{tid}", timeout=timeout)

    def create_timeline(self, tid: str, system_id: int, pg_version: int, start_lsn: int) -> dict:
        return self._call("POST", "/v1/timeline", {"timeline_id": tid, "system_id": system_id,
                                                   "pg_version": pg_version, "start_lsn": start_lsn})

    def delete_timeline(self, tid: str) -> dict:
        return self._call("DELETE", f"/v1/timeline/{tid}")

    def vote(self, tid: str, term: int, timeout: float = 30.0) -> dict:
        return self._call("POST", f"/v1/timeline/{tid}/vote", {"term": term}, timeout=timeout)

    def elected(self, tid: str, term: int, start_streaming_at: int, term_history: list) -> dict:
        return self._call("POST", f"/v1/timeline/{tid}/elected", {
            "term": term, "start_streaming_at": start_streaming_at, "term_history": term_history})

    def recover(self, tid: str, term: int, donor: str, up_to: int) -> dict:
        """Fetch the WAL up to `up_to` from the donor safekeeper (peer recovery)."""
        return self._call("POST", f"/v1/timeline/{tid}/recover", {"term": term, "donor": donor, "up_to": up_to},
                          timeout=300)

    def commit(self, tid: str, term: int, commit_lsn: int, timeout: float = 30.0) -> dict:
        return self._call("POST", f"/v1/timeline/{tid}/commit", {"term": term, "commit_lsn": commit_lsn},
                          timeout=timeout)

    def attach_compute(self, tid: str, body: dict) -> dict:
        """Stream from the compute described by `body` (term, start_lsn, host, port, user)."""
        return self._call("POST", f"/v1/timeline/{tid}/compute", body)

    def detach_compute(self, tid: str) -> dict:
        return self._call("DELETE", f"/v1/timeline/{tid}/compute")

    def repair(self, tid: str, pageserver: dict | None = None) -> dict:
        """Rebuild a timeline whose files are damaged from its peers; a safekeeper without peers at the end of
        the pageserver's WAL, `pageserver` = {last_record_lsn, system_id, pg_version, wal_seg_size}."""
        body = {} if pageserver is None else {"pageserver": pageserver}
        return self._call("POST", f"/v1/timeline/{tid}/repair", body, timeout=120)


def flush_lsn(project, timeline_id: str) -> int:
    """Where the timeline's WAL ends: the highest flush LSN among the project's safekeepers."""
    return max(c.timeline(timeline_id)["flush_lsn"] for c in SafekeeperClient.all_of(project).values())
