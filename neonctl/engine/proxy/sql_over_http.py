"""`POST /sql`: Neon's SQL-over-HTTP, as the `@neondatabase/serverless` driver's `neon()` speaks it.

Request: JSON `{"query", "params"}` or a batch `{"queries": [...]}` run in one transaction, with headers
`Neon-Connection-String` (the proxy URI: role, password, database, and the branch in `options=endpoint=`
or in the password form), `Neon-Array-Mode`, `Neon-Raw-Text-Output` and, for batches,
`Neon-Batch-Isolation-Level`, `Neon-Batch-Read-Only`, `Neon-Batch-Deferrable` (only the literal `true`
is true). Response: `command`, `rowCount`, `rowAsArray`, `rows` (raw text values), `fields`; a batch
`{"results": [...]}`. A Postgres error is a 400 with all its fields, so the driver raises `NeonDbError`
with `.code`; anything malformed is a 4xx with a JSON `message`; a body over the limit is 507, as Neon.
Authentication and routing are the TCP path's (`relay.py`), the connection comes from `conn_cache.py`.
"""

from __future__ import annotations

import hmac
import json
import logging
from urllib.parse import parse_qs, unquote, urlsplit

from aiohttp import web

from neonctl.engine.proxy import protocol
from neonctl.engine.proxy.backend_conn import QueryError, Result
from neonctl.engine.proxy.conn_cache import ConnCache
from neonctl.engine.proxy.sessions import Sessions
from neonctl.engine.proxy.wake import Waker
from neonctl.errors import InvalidInput, NeonctlError, NotFound

log = logging.getLogger("proxy.sql")
MAX_REQUEST_BYTES = 10 * 1024 * 1024  # Neon's limit
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
ISOLATION = {"Serializable": "SERIALIZABLE", "ReadUncommitted": "READ UNCOMMITTED",
             "ReadCommitted": "READ COMMITTED", "RepeatableRead": "REPEATABLE READ"}
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, "
                                        "Neon-Array-Mode, Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, "
                                        "Neon-Batch-Deferrable, Neon-Pool-Opt-In",
        "Access-Control-Max-Age": "86400"}


def _reply(status: int, body: dict) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=CORS)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def parse_connection_string(value: str | None) -> tuple[str, str, str, str | None]:
    """(role, password, database, endpoint or None) from a `postgresql://` URI."""
    if not value:
        raise BadRequest("missing Neon-Connection-String header")
    try:
        u = urlsplit(value)
        port_ok = u.port is None or u.port > 0
    except ValueError:
        raise BadRequest("malformed Neon-Connection-String: not a URL") from None
    if u.scheme not in ("postgres", "postgresql") or not u.username or not port_ok:
        raise BadRequest("malformed Neon-Connection-String: expected postgresql://ROLE:PASSWORD@HOST/DATABASE")
    role, password = unquote(u.username), unquote(u.password or "")
    database = unquote(u.path.lstrip("/")) or role
    options = parse_qs(u.query).get("options", [None])[0]
    endpoint, _rest = protocol.split_endpoint_option(options)
    if endpoint is None:
        endpoint, password = protocol.endpoint_from_password(password)
    return role, password, database, endpoint


def _flag(request: web.Request, name: str) -> bool:
    return request.headers.get(name, "").strip() == "true"


def _result_json(res: Result, array_mode: bool) -> dict:
    rows = res.rows if array_mode else [{f["name"]: v for f, v in zip(res.fields, row, strict=False)}
                                         for row in res.rows]
    return {"command": res.command, "rowCount": res.row_count, "rowAsArray": array_mode, "rows": rows,
            "fields": res.fields}


def _parse_query(item) -> tuple[str, list[str | None]]:
    if not isinstance(item, dict) or not isinstance(item.get("query"), str):
        raise BadRequest('each query must be an object with a string "query"')
    params = item.get("params", [])
    if not isinstance(params, list):
        raise BadRequest('"params" must be an array')
    out: list[str | None] = []
    for v in params:
        if v is None:
            out.append(None)
        elif isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, (int, float, str)):
            out.append(str(v))
        else:
            out.append(json.dumps(v))  # objects and arrays: their JSON text, as node-postgres sends them
    return item["query"], out


class SqlOverHttp:
    def __init__(self, waker: Waker, sessions: Sessions, roles, cache: ConnCache):
        self.waker, self.sessions, self.roles, self.cache = waker, sessions, roles, cache

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except BadRequest as e:
            body = {"message": e.message}
            if e.code:
                body["code"] = e.code
            return _reply(e.status, body)

    async def _handle(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            raise BadRequest(f"request body is larger than {MAX_REQUEST_BYTES} bytes", 507)
        raw = await request.content.read(MAX_REQUEST_BYTES + 1)
        if len(raw) > MAX_REQUEST_BYTES:
            raise BadRequest(f"request body is larger than {MAX_REQUEST_BYTES} bytes", 507)
        try:
            payload = json.loads(raw)
        except ValueError:
            raise BadRequest("request body is not valid JSON") from None
        role, password, database, endpoint = parse_connection_string(request.headers.get("Neon-Connection-String"))
        spec = self.roles().get(role)
        expected = spec.password if spec else ""
        if spec is None or not hmac.compare_digest(password.encode(), expected.encode()):
            raise BadRequest(f'password authentication failed for user "{role}"', 400, "28P01")
        array_mode = _flag(request, "Neon-Array-Mode")
        batch = isinstance(payload, dict) and "queries" in payload
        if batch:
            if not isinstance(payload["queries"], list):
                raise BadRequest('"queries" must be an array')
            queries = [_parse_query(q) for q in payload["queries"]]
            level = request.headers.get("Neon-Batch-Isolation-Level")
            if level is not None and level not in ISOLATION:
                raise BadRequest(f"invalid Neon-Batch-Isolation-Level {level!r}: one of {', '.join(ISOLATION)}")
            begin = "BEGIN" + (f" ISOLATION LEVEL {ISOLATION[level]}" if level else "")
            begin += " READ ONLY" if _flag(request, "Neon-Batch-Read-Only") else ""
            begin += " DEFERRABLE" if _flag(request, "Neon-Batch-Deferrable") else ""
        else:
            queries = [_parse_query(payload)]
            begin = None
        try:
            target = protocol.parse_endpoint(endpoint) if endpoint else None
            point = self.waker.point(target.branch if target else None, target.at if target else None)
            addr = await self.waker.wake(point, False)
        except protocol.ProtocolViolation as e:
            raise BadRequest(e.message, 400, e.sqlstate) from None
        except (NotFound, InvalidInput) as e:
            raise BadRequest(str(e), 400, "08004") from None
        except NeonctlError as e:
            raise BadRequest(f"could not wake the compute: {e}", 503, "08006") from None
        self.sessions.opened(addr.endpoint)
        try:
            return await self._run(addr, role, database, queries, begin, array_mode)
        finally:
            self.sessions.closed(addr.endpoint)

    async def _run(self, addr, role, database, queries, begin, array_mode) -> web.Response:
        key = (addr.endpoint, role, database)
        for attempt in range(2):  # a cached connection may have died with its compute: one fresh retry
            try:
                conn = await self.cache.checkout(key, addr.host, addr.port, role, database)
            except QueryError as e:
                return _reply(400, e.fields)
            except (OSError, ConnectionError) as e:
                raise BadRequest(f"cannot connect to the compute of {addr.endpoint}: {e}", 503, "08006") from None
            reused = conn.queries_run > 0
            try:
                if begin is None:
                    res = await conn.query(*queries[0])
                    body = _result_json(res, array_mode)
                else:
                    await conn.query(begin)
                    results = []
                    try:
                        for q in queries:
                            results.append(_result_json(await conn.query(*q), array_mode))
                        await conn.query("COMMIT")
                    except QueryError:
                        await conn.query("ROLLBACK")
                        raise
                    body = {"results": results}
            except QueryError as e:
                self.cache.checkin(conn)
                return _reply(400, e.fields)
            except (OSError, ConnectionError):
                conn.close()
                if attempt == 0 and reused:  # stale in the cache (its compute went away): nothing ran
                    continue
                raise BadRequest(f"the compute of {addr.endpoint} closed the connection", 503, "08006") from None
            self.cache.checkin(conn)
            text = json.dumps(body)
            if len(text) > MAX_RESPONSE_BYTES:
                raise BadRequest(f"response is larger than {MAX_RESPONSE_BYTES} bytes", 507)
            return web.Response(status=200, text=text, content_type="application/json", headers=CORS)
        raise BadRequest(f"the compute of {addr.endpoint} is not answering", 503, "08006")
