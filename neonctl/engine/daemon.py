"""What every storage daemon shares: logging set-up, an aiohttp app runner, signal handling, JSON errors."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import web

from neonctl.engine import failpoints
from neonctl.engine.credentials import daemon_token
from neonctl.engine.process import hold_daemon_lock
from neonctl.errors import Conflict, InvalidInput, NeonctlError, NotFound


def setup_logging(name: str) -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Check the project's credential, and turn engine errors into JSON responses the client side re-raises
    as NeonctlError."""
    token = request.app.get("api_token")
    if token and request.path not in request.app.get("public_paths", ()):
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            resp = web.json_response({"error": "missing or wrong credential for this daemon",
                                      "kind": "Unauthorized", "hint": "neonctl sends the project's API token"},
                                     status=401)
            resp.headers["X-Neonctl-Pid"] = str(os.getpid())
            return resp
    try:
        resp = await handler(request)
    except NeonctlError as e:
        status = 404 if isinstance(e, NotFound) else 409 if isinstance(e, Conflict) else 400
        resp = web.json_response({"error": e.message, "kind": e.kind, "hint": e.hint}, status=status)
    # Who answered: a daemon of another home on the same port must not pass for ours.
    resp.headers["X-Neonctl-Pid"] = str(os.getpid())
    return resp


def json_body(obj) -> web.Response:
    return web.Response(text=json.dumps(obj), content_type="application/json")


async def _set_failpoints(request: web.Request) -> web.Response:
    """Test-only: arm fault points in this daemon ({"name": "crash" | "sleep(MS)", ...}; {} disarms)."""
    body = await request.json()
    if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
        raise InvalidInput('expected {"fault point": "crash" | "sleep(MS)", ...}')
    failpoints.configure(body)
    return json_body({"failpoints": body})


log = logging.getLogger(__name__)

RESTART_DELAY = 1.0  # seconds before a background task that raised runs again


async def supervise(fn: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event,
                    delay: float = RESTART_DELAY) -> None:
    """Run a daemon's background task until stop; if it raises, log it and run it again.

    A background loop (layer builder, image creation, WAL receipt) that died on one unexpected error
    would otherwise end silently while the daemon kept answering, and everything waiting on that loop
    would time out much later, far from the cause.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    while not stop.is_set():
        try:
            await fn(stop)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - logged with its traceback; the task runs again
            log.exception("background task %s failed; it runs again in %.1f s", name, delay)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass


def serve(app: web.Application, host: str, port: int,
          background: list[Callable[[asyncio.Event], Awaitable[None]]]) -> None:
    """Run the app and background tasks until SIGTERM/SIGINT, then stop tasks and exit cleanly."""

    app["api_token"] = daemon_token()
    if os.environ.get("NEONCTL_TESTING") == "1":
        app.router.add_put("/v1/failpoints", _set_failpoints)
    hold_daemon_lock()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            print(f"fatal: cannot listen on {host}:{port}: {e.strerror}", flush=True)
            raise SystemExit(1) from None
        tasks = [asyncio.create_task(supervise(fn, stop)) for fn in background]
        # What start-up loaded (modules, numba's kernels, timelines) lives as long as the daemon: out of the
        # collector's generations, a full collection no longer walks it - 20-50 ms in the pageserver, landing
        # at random in a request (a start's rebuild).
        gc.freeze()
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        on_stop = app.get("on_stop")
        if on_stop:
            on_stop()
        await runner.cleanup()

    asyncio.run(main())
