"""The proxy's protocol codec and SCRAM with bytes alone: no sockets, no Postgres."""

from __future__ import annotations

import base64
import struct

import pytest

from neonctl.engine import pgwire
from neonctl.engine.proxy import protocol as p
from neonctl.engine.proxy import scram


def startup(params: dict[str, str], version: int = p.PROTOCOL_V3) -> bytes:
    body = struct.pack("!I", version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def test_startup_byte_by_byte_then_complete():
    pkt = startup({"user": "alice", "database": "db", "application_name": "", "options": "endpoint=main"})
    for i in range(len(pkt)):
        assert p.parse_initial(pkt[:i]) is None
    ev, used = p.parse_initial(pkt + b"Qnext")
    assert used == len(pkt)
    assert ev == p.Startup(p.PROTOCOL_V3, {"user": "alice", "database": "db", "application_name": "",
                                           "options": "endpoint=main"})


def test_ssl_gss_and_cancel_requests():
    assert p.parse_initial(struct.pack("!II", 8, p.SSL_REQUEST)) == (p.SSLRequest(), 8)
    assert p.parse_initial(struct.pack("!II", 8, p.GSSENC_REQUEST)) == (p.GSSENCRequest(), 8)
    cancel = p.cancel_request(1234, 0xDEADBEEF)
    assert p.parse_initial(cancel) == (p.CancelRequest(1234, 0xDEADBEEF), 16)


@pytest.mark.parametrize("data, sqlstate, text", [
    (struct.pack("!II", 8, 2 << 16), "08P01", "unsupported frontend protocol 2.0"),
    (struct.pack("!II", 4, 0), "08P01", "invalid length"),
    (struct.pack("!I", 20000) + b"x" * 8, "08P01", "invalid length"),
    (b"GET / HTTP/1.1\r\n\r\n", "08P01", "invalid length"),
    (struct.pack("!III", 12, p.CANCEL_REQUEST, 1), "08P01", "cancel request"),
    (startup({"database": "x"}), "28000", "no PostgreSQL user name"),
    (struct.pack("!II", 12, p.PROTOCOL_V3) + b"user", "08P01", "terminator"),
    (struct.pack("!II", 14, p.PROTOCOL_V3) + b"user\0\0", "08P01", "no value"),
    (struct.pack("!II", 19, p.PROTOCOL_V3) + b"user\0\xff\xfe\0\0\0\0"[:11], "08P01", "UTF-8"),
])
def test_bad_initial_packets(data, sqlstate, text):
    with pytest.raises(p.ProtocolViolation) as e:
        p.parse_initial(data)
    assert e.value.sqlstate == sqlstate and text in e.value.message


def test_auth_messages_round_trip():
    assert p.auth_ok() == b"R" + struct.pack("!II", 8, 0)
    assert p.auth_cleartext() == b"R" + struct.pack("!II", 8, 3)
    kind, body = _one(p.auth_sasl(["SCRAM-SHA-256"]))
    assert kind == b"R" and body == struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0"
    assert p.parse_password(b"secret\0") == "secret"
    init = b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"hello"
    assert p.parse_sasl_initial(init) == ("SCRAM-SHA-256", b"hello")
    assert p.parse_sasl_initial(b"X\0" + struct.pack("!i", -1)) == ("X", None)
    with pytest.raises(p.ProtocolViolation):
        p.parse_sasl_initial(b"SCRAM-SHA-256\0" + struct.pack("!i", 9) + b"short")
    with pytest.raises(p.ProtocolViolation):
        p.parse_password(b"no terminator")
    kind, body = _one(p.backend_key_data(42, 7))
    assert kind == b"K" and p.parse_backend_key_data(body) == (42, 7)


def _one(data: bytes) -> tuple[bytes, bytes]:
    buf = pgwire.MessageBuffer()
    buf.feed(data)
    return buf.next_message()


def test_error_response_fields():
    kind, body = _one(p.error_response("28P01", 'password authentication failed for user "x"', hint="try again"))
    f = pgwire.parse_error_fields(body)
    assert kind == b"E" and f["S"] == "FATAL" and f["C"] == "28P01" and f["H"] == "try again" and "x" in f["M"]


@pytest.mark.parametrize("options, endpoint, rest", [
    (None, None, None),
    ("endpoint=main", "main", None),
    ("-c search_path=x endpoint=fix", "fix", "-c search_path=x"),
    ("--endpoint=main@0/16B3748 -c a=b", "main@0/16B3748", "-c a=b"),
    ("endpoint%3Dmain-pooler", "main-pooler", None),
    ("-c statement_timeout=5", None, "-c statement_timeout=5"),
])
def test_endpoint_option(options, endpoint, rest):
    assert p.split_endpoint_option(options) == (endpoint, rest)


def test_password_hack_and_endpoint_names():
    assert p.endpoint_from_password("endpoint=main;s3cret") == ("main", "s3cret")
    assert p.endpoint_from_password("endpoint=dev$pw;with;semicolons") == ("dev", "pw;with;semicolons")
    assert p.endpoint_from_password("plainpassword") == (None, "plainpassword")
    assert p.parse_endpoint("main") == p.EndpointTarget("main", None, False)
    assert p.parse_endpoint("main-pooler") == p.EndpointTarget("main", None, True)
    assert p.parse_endpoint("fix@0/16B3748") == p.EndpointTarget("fix", "0/16B3748", False)
    assert p.parse_endpoint("fix@2026-12-04T01:00:00Z") == p.EndpointTarget("fix", "2026-12-04T01:00:00Z", False)
    for bad in ("", "../x", "a b", "main@", "x" * 64):
        with pytest.raises(p.ProtocolViolation):
            p.parse_endpoint(bad)


# -- SCRAM ---------------------------------------------------------------------------------------------------

RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")


def test_rfc7677_vector():
    server = scram.ScramServer(scram.make_verifier("pencil", salt=RFC_SALT),
                               server_nonce="%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    client = scram.ScramClient("pencil", client_nonce="rOprNGfwEbeRWgbNEkqO", user="user")
    first = server.client_first(client.first())
    assert first == b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = client.final(first)
    assert final.endswith(b",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    answer = server.client_final(final)
    assert answer == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify(answer)


def test_verifier_format_and_wrong_password():
    v = scram.make_verifier("right")
    parsed = scram.parse_verifier(v)
    assert v.startswith("SCRAM-SHA-256$4096:") and len(parsed.salt) == 16 and len(parsed.stored_key) == 32
    server = scram.ScramServer(v)
    client = scram.ScramClient("wrong")
    final = client.final(server.client_first(client.first()))
    with pytest.raises(scram.AuthenticationFailed) as e:
        server.client_final(final)
    assert e.value.sqlstate == "28P01"


def test_scram_protocol_violations():
    v = scram.make_verifier("pw")
    with pytest.raises(p.ProtocolViolation, match="channel binding"):
        scram.ScramServer(v).client_first(b"p=tls-server-end-point,,n=,r=abc")
    with pytest.raises(p.ProtocolViolation):
        scram.ScramServer(v).client_first(b"garbage")
    server = scram.ScramServer(v)
    client = scram.ScramClient("pw")
    final = client.final(server.client_first(client.first()))
    with pytest.raises(p.ProtocolViolation, match="nonce"):
        server.client_final(final.replace(b"r=", b"r=X", 1))
    with pytest.raises(p.ProtocolViolation, match="before"):
        scram.ScramServer(v).client_final(final)
    with pytest.raises(ValueError):
        scram.parse_verifier("md5abcdef")


def test_saslprep_normalises_like_postgres():
    # NFKC: a ligature and its letters are the same password; a non-ASCII space maps to a space
    assert scram.saslprep("\ufb01x") == b"fix"
    assert scram.saslprep("a\u00a0b") == b"a b"
    v = scram.make_verifier("\ufb01x")
    server = scram.ScramServer(v)
    client = scram.ScramClient("fix")
    server.client_final(client.final(server.client_first(client.first())))
