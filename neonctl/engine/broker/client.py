"""The broker's HTTP API as Python methods, for neonctl's own code and the tests (the daemons publish
and subscribe over their own async connections)."""

from __future__ import annotations

from neonctl.engine import client


class BrokerClient:
    def __init__(self, address: str):
        self.address = address

    @classmethod
    def of(cls, project) -> BrokerClient:
        return cls(project.broker_addr)

    def status(self, timeout: float = 30.0) -> dict:
        """The broker's version counter and how many timelines it knows."""
        return client.call("broker", self.address, "GET", "/v1/status", timeout=timeout)

    def subscribe(self, after: int = -1, wait: float = 0.0) -> dict:
        """The timelines' state once it changed past version `after` (waiting up to `wait` seconds)."""
        return client.call("broker", self.address, "GET", f"/v1/subscribe?after={after}&wait={wait}",
                           timeout=wait + 30)

    def publish(self, safekeeper_id: int, address: str, timelines: dict) -> dict:
        return client.call("broker", self.address, "POST", "/v1/publish",
                           {"safekeeper_id": safekeeper_id, "address": address, "timelines": timelines})
