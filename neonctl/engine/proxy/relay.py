"""One client connection through the proxy: negotiate, authenticate, route, wake, connect, relay.

The order is Neon's: nothing is started before the client proved its password, so a wrong password
(28P01) or an unknown branch costs no compute. Routing follows Neon's conventions (`protocol.py`): the
startup option `endpoint=BRANCH[@LSN|@TIME][-pooler]` with SCRAM-SHA-256, or - for clients that cannot set
options - the password `endpoint=BRANCH;PASSWORD` over cleartext, and the default branch when neither names
one. The proxy authenticates against the project's role verifiers (`engine/roles.py`) and reaches the
compute over its private Unix socket, where the compute trusts the connection - or, where the kernel can
join the session's two sockets (`shortcut.py`), over TCP with SCRAM as the session's role. The client gets the proxy's
own cancel key, so a CancelRequest finds the compute that runs its session (`sessions.py`). An established
session is relayed by the kernel (`kernel_relay.py`) where the proxy could set that up, else by `link.splice`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

from neonctl.engine import pgwire
from neonctl.engine.proxy import protocol, scram
from neonctl.engine.proxy.kernel_relay import KernelRelay
from neonctl.engine.proxy.link import Link, splice
from neonctl.engine.proxy.sessions import CancelTarget, Sessions
from neonctl.engine.proxy.wake import ComputeAddress, Waker
from neonctl.engine.roles import Role, new_password
from neonctl.errors import InvalidInput, NeonctlError, NotFound

log = logging.getLogger("proxy.relay")
HANDSHAKE_TIMEOUT = 30.0  # a client that does not finish start-up and authentication in time is dropped


class _PasswordRefusedOverTcp(Exception):
    """The compute refused the role's password from the spec (it has an older one): try its Unix socket."""


class Refused(Exception):
    """Tell the client why (an ErrorResponse with this SQLSTATE) and close."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint


def _message(link: Link) -> tuple[bytes, bytes] | None:
    """One complete typed message from the link's buffer, or None if more bytes are needed."""
    if len(link.buf) < 5:
        return None
    n = int.from_bytes(link.buf[1:5], "big")
    if n < 4 or n > 1 << 20:
        raise Refused("08P01", "invalid message length")
    if len(link.buf) < 1 + n:
        return None
    kind, body = bytes(link.buf[:1]), bytes(link.buf[5 : 1 + n])
    del link.buf[: 1 + n]
    return kind, body


async def _next(link: Link, deadline: float) -> tuple[bytes, bytes]:
    while True:
        msg = _message(link)
        if msg is not None:
            return msg
        await link.read_more(max(0.01, deadline - time.monotonic()))


class Session:
    def __init__(self, client: Link, waker: Waker, sessions: Sessions, roles, kernel: KernelRelay | None = None):
        self.client = client
        self.kernel = kernel  # relays established sessions in the kernel when the proxy has one
        self.waker = waker
        self.sessions = sessions
        self.roles = roles  # () -> dict[str, Role], the current spec
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT

    async def run(self) -> None:
        if self.kernel is not None:
            self.kernel.adopt(self.client)
        try:
            await self._run()
        except Refused as e:
            self.client.write(protocol.error_response(e.sqlstate, e.message, hint=e.hint))
            self.client.close()
        except protocol.ProtocolViolation as e:
            self.client.write(protocol.error_response(e.sqlstate, e.message))
            self.client.close()
        except (ConnectionError, TimeoutError):
            self.client.close()
        except Exception:  # noqa: BLE001 - one session's bug must not take the proxy down; it is logged
            log.exception("session failed")
            self.client.write(protocol.error_response("XX000", "internal error in the neonctl proxy"))
            self.client.close()

    async def _startup(self) -> protocol.Startup | None:
        while True:
            parsed = protocol.parse_initial(self.client.buf)
            if parsed is None:
                await self.client.read_more(max(0.01, self.deadline - time.monotonic()))
                continue
            event, used = parsed
            del self.client.buf[:used]
            if isinstance(event, (protocol.SSLRequest, protocol.GSSENCRequest)):
                self.client.write(b"N")  # plain connections only, on 127.0.0.1
                continue
            if isinstance(event, protocol.CancelRequest):
                await self._cancel(event)
                return None
            return event

    async def _cancel(self, req) -> None:
        target = self.sessions.cancel_target(req.pid, req.secret)
        self.client.close()
        if target is None:
            return  # as Postgres: no answer either way
        try:
            _r, w = await asyncio.wait_for(asyncio.open_unix_connection(f"{target.host}/.s.PGSQL.{target.port}"), 5)
            w.write(protocol.cancel_request(target.pid, target.secret))
            await w.drain()
            w.close()
        except (TimeoutError, OSError) as e:
            log.warning("cancel request could not reach %s: %s", target.host, e)

    async def _run(self) -> None:
        startup = await self._startup()
        if startup is None:
            return
        params = dict(startup.params)
        user = params["user"]
        database = params.get("database") or user
        endpoint, rest = protocol.split_endpoint_option(params.get("options"))
        role = self.roles().get(user)
        if endpoint is not None:
            await self._scram(user, role)
        else:
            endpoint = await self._cleartext(user, role)
        target = protocol.parse_endpoint(endpoint) if endpoint else None
        try:
            point = self.waker.point(target.branch if target else None, target.at if target else None)
            addr = await self.waker.wake(point, bool(target and target.pooled))
        except NotFound as e:
            raise Refused("08004", str(e)) from None
        except InvalidInput as e:
            raise Refused("08004", str(e)) from None
        except NeonctlError as e:
            raise Refused("08006", f"could not wake the compute for {endpoint or 'the default branch'}: {e}") from None
        await self._connect_and_relay(addr, role, database, rest, params)

    async def _scram(self, user: str, role: Role | None) -> None:
        # An unknown role runs the whole exchange against a throw-away verifier and fails like a wrong
        # password: the answer does not tell which roles exist.
        server = scram.ScramServer(role.verifier if role else scram.make_verifier(new_password()))
        self.client.write(protocol.auth_sasl(["SCRAM-SHA-256"]))
        kind, body = await _next(self.client, self.deadline)
        if kind != b"p":
            raise Refused("08P01", "expected a SASLInitialResponse")
        mechanism, data = protocol.parse_sasl_initial(body)
        if mechanism != "SCRAM-SHA-256":
            raise Refused("28000", f"unsupported SASL mechanism {mechanism!r}")
        self.client.write(protocol.auth_sasl_continue(server.client_first(data or b"")))
        kind, body = await _next(self.client, self.deadline)
        if kind != b"p":
            raise Refused("08P01", "expected a SASLResponse")
        try:
            final = server.client_final(body)
        except scram.AuthenticationFailed:
            raise Refused("28P01", f'password authentication failed for user "{user}"') from None
        if role is None:
            raise Refused("28P01", f'password authentication failed for user "{user}"')
        self.client.write(protocol.auth_sasl_final(final))

    async def _cleartext(self, user: str, role: Role | None) -> str | None:
        self.client.write(protocol.auth_cleartext())
        kind, body = await _next(self.client, self.deadline)
        if kind != b"p":
            raise Refused("08P01", "expected a password message")
        endpoint, password = protocol.endpoint_from_password(protocol.parse_password(body))
        expected = role.password if role else new_password()
        if not hmac.compare_digest(password.encode(), expected.encode()) or role is None:
            raise Refused("28P01", f'password authentication failed for user "{user}"')
        return endpoint

    async def _open_compute(self, addr: ComputeAddress, tcp: bool = True) -> tuple[Link, tuple[str, int] | None]:
        """The session's connection to the compute, and the address the shortcut watches for it.

        Over TCP from a socket the shortcut watches where the kernel can join the session's two ends (the
        compute then asks for the role's password, as it asks any TCP client); else over the compute's
        (or PgBouncer's) Unix socket, where it trusts the proxy."""
        loop = asyncio.get_running_loop()
        shortcut = self.kernel.shortcut if self.kernel is not None else None
        sock = None
        if tcp and shortcut is not None and (addr.host, addr.port) == (addr.pg_host, addr.pg_port):
            try:
                sock = shortcut.backend_socket()
            except OSError as e:  # e.g. the watch map full: this session goes without the shortcut
                log.info("no socket shortcut for a session of %s: %s", addr.endpoint, e)
        if sock is not None:
            watched = sock.getsockname()
            try:
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", addr.port)), 10)
                _t, server = await loop.create_connection(Link, sock=sock)
            except BaseException:
                sock.close()
                shortcut.unwatch_remote(watched)
                raise
            return server, watched
        _t, server = await asyncio.wait_for(loop.create_unix_connection(Link, f"{addr.host}/.s.PGSQL.{addr.port}"), 10)
        return server, None

    def _compute_auth(self, server: Link, role: Role, body: bytes, scram_client, endpoint: str):
        """Answer the compute's authentication request `body` (a TCP connection asks for SCRAM); the
        client already has its AuthenticationOk from the proxy. Returns the SCRAM state to keep."""
        code = int.from_bytes(body[:4], "big")
        if code == protocol.AUTH_OK:
            return scram_client
        if code == protocol.AUTH_SASL and b"SCRAM-SHA-256\0" in body[4:] and scram_client is None:
            scram_client = scram.ScramClient(role.password)
            first = scram_client.first()
            server.write(pgwire.message(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
            return scram_client
        if code == protocol.AUTH_SASL_CONTINUE and scram_client is not None:
            server.write(pgwire.message(b"p", scram_client.final(body[4:])))
            return scram_client
        if code == protocol.AUTH_SASL_FINAL and scram_client is not None:
            scram_client.verify(body[4:])
            return scram_client
        raise Refused("08006", f"the compute of {endpoint} asked the proxy for an authentication it does not give")

    async def _connect_and_relay(self, addr: ComputeAddress, role: Role, database: str, rest: str | None,
                                 params: dict[str, str]) -> None:
        for tcp in (True, False):
            try:
                server, watched = await self._open_compute(addr, tcp)
            except (TimeoutError, OSError) as e:
                raise Refused("08006", f"cannot connect to the compute of {addr.endpoint}: {e}") from None
            try:
                await self._start_and_relay(server, addr, role, database, rest, params, tcp=watched is not None)
                return
            except _PasswordRefusedOverTcp:
                # A read-only time-travel compute keeps the roles it started with: a password reset (or a
                # role created) since then is unknown to it. The Unix socket, trusted, does not ask.
                log.info("the compute of %s refused %s's current password over TCP: using its Unix socket",
                         addr.endpoint, role.name)
            finally:
                if watched is not None:  # the backend's socket has long joined the shortcut's map
                    self.kernel.shortcut.unwatch_remote(watched)

    async def _start_and_relay(self, server: Link, addr: ComputeAddress, role: Role, database: str,
                               rest: str | None, params: dict[str, str], tcp: bool) -> None:
        forward = {k: v for k, v in params.items() if k not in ("user", "database", "options")}
        forward.update(user=role.name, database=database)
        if rest:
            forward["options"] = rest
        server.write(pgwire.startup_message(forward))
        out = [protocol.auth_ok()]
        key = None
        scram_client = None
        try:
            while True:
                kind, body = await _next(server, self.deadline)
                if kind == b"R":
                    try:
                        scram_client = self._compute_auth(server, role, body, scram_client, addr.endpoint)
                    except (scram.AuthenticationFailed, protocol.ProtocolViolation) as e:
                        raise Refused("08006", f"the compute of {addr.endpoint} failed SCRAM with the proxy: {e}") \
                            from None
                    continue  # the client already got its AuthenticationOk from us
                if kind == b"E" and tcp and pgwire.parse_error_fields(body).get("C") in ("28P01", "28000"):
                    server.close()
                    raise _PasswordRefusedOverTcp
                if kind == b"E":  # e.g. the database does not exist: the compute's own words
                    self.client.write(b"".join(out) + pgwire.message(kind, body))
                    server.close()
                    self.client.close()
                    return
                if kind == b"K":
                    pid, secret = protocol.parse_backend_key_data(body)
                    # (for a pooled session the cancel goes to PgBouncer, which forwards it)
                    key = self.sessions.issue_key(CancelTarget(addr.host, addr.port, pid, secret))
                    out.append(protocol.backend_key_data(*key))
                    continue
                out.append(pgwire.message(kind, body))
                if kind == b"Z":
                    break
        except BaseException:
            server.close()
            self.sessions.forget_key(key)
            raise
        self.sessions.opened(addr.endpoint)

        def ended() -> None:
            self.sessions.closed(addr.endpoint)
            self.sessions.forget_key(key)

        server.on_close(ended)
        first = b"".join(out)  # ends in ReadyForQuery: until the client has it, neither side sends
        if self.kernel is not None and self.client.raw and self.kernel.join(self.client, server, first):
            return
        if self.kernel is not None and not self.client.raw and tcp:
            self.kernel.frame_backend(self.client, server)  # before `first`: the backend is quiet until asked
        self.client.write(first)
        splice(self.client, server)
