"""Synchronous JSON-over-HTTP client the CLI uses to talk to the storage daemons.

A daemon's JSON error ({"error", "kind", "hint"}) comes back as the same
NeonctlError subclass; a daemon that does not answer becomes a DaemonError
naming it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from neonctl import errors


def call(name: str, address: str, method: str, path: str, body: dict | None = None,
         timeout: float = 30.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{address}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            payload = json.loads(e.read())
        except ValueError:
            raise errors.DaemonError(f"{name} answered HTTP {e.code} to {method} {path}") from None
        cls = getattr(errors, payload.get("kind", ""), errors.DaemonError)
        if not (isinstance(cls, type) and issubclass(cls, errors.NeonctlError)):
            cls = errors.DaemonError
        raise cls(payload.get("error", str(e)), payload.get("hint")) from None
    except (urllib.error.URLError, OSError) as e:
        raise errors.DaemonError(f"{name} at {address} is not reachable: {getattr(e, 'reason', e)}",
                                 hint="run `neonctl start`") from None
