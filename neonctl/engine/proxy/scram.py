"""SCRAM-SHA-256 as Postgres speaks it (RFC 5802 and 7677), both sides, without channel binding.

The proxy is the server for its clients: it holds only each role's verifier (salt, iterations, StoredKey,
ServerKey, in Postgres's `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` format), checks the
client's proof against StoredKey and proves itself with ServerKey, so a leaked verifier does not give
away the password. Connections are plain TCP on 127.0.0.1, so only the `n,,`/`y,,` GS2 headers are
accepted (no `p=` channel binding). The client side exists for tests and tools.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

from neonctl.engine.proxy.protocol import ProtocolViolation

DEFAULT_ITERATIONS = 4096  # Postgres's scram_iterations default


class AuthenticationFailed(Exception):
    """The client's proof does not match the verifier: a wrong password (SQLSTATE 28P01)."""

    sqlstate = "28P01"


@dataclass(frozen=True)
class Verifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def __str__(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        return f"SCRAM-SHA-256${self.iterations}:{b64(self.salt)}${b64(self.stored_key)}:{b64(self.server_key)}"


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def saslprep(password: str) -> bytes:
    """Postgres's pg_saslprep for the common case: NFKC, and the raw bytes if the result is not allowed."""
    mapped = "".join(c for c in password if not stringprep.in_table_b1(c))
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in mapped)
    norm = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7,
                  stringprep.in_table_c8, stringprep.in_table_c9, stringprep.in_table_a1)
    if not norm or any(check(c) for c in norm for check in prohibited):
        return password.encode()
    return norm.encode()


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


@functools.lru_cache(maxsize=256)
def _client_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """`_keys` for the client side, kept: the proxy authenticates to computes with the same role's
    password and salt again and again, and the PBKDF2 is the whole cost of a SCRAM exchange."""
    return _keys(password, salt, iterations)


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    client_key, server_key = _keys(password, salt, iterations)
    return str(Verifier(iterations, salt, hashlib.sha256(client_key).digest(), server_key))


def parse_verifier(text: str) -> Verifier:
    try:
        method, rest = text.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored, server = keys.split(":", 1)
        if method != "SCRAM-SHA-256":
            raise ValueError(method)
        return Verifier(int(iterations), base64.b64decode(salt, validate=True),
                        base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {e}") from None


def _attrs(msg: str) -> list[tuple[str, str]]:
    out = []
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolViolation("08P01", "malformed SCRAM message")
        out.append((part[0], part[2:]))
    return out


class ScramServer:
    """One server-side exchange: client-first -> server-first, client-final -> server-final."""

    def __init__(self, verifier: str, nonce_bytes: int = 18, server_nonce: str | None = None):
        self.v = parse_verifier(verifier)
        self.server_nonce = server_nonce or base64.b64encode(secrets.token_bytes(nonce_bytes)).decode()
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def client_first(self, data: bytes) -> bytes:
        try:
            msg = data.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("08P01", "SCRAM message is not UTF-8") from None
        parts = msg.split(",", 2)
        if len(parts) != 3:
            raise ProtocolViolation("08P01", "malformed SCRAM client-first-message")
        cbind, authzid, bare = parts
        if cbind.startswith("p="):
            raise ProtocolViolation("08P01", "SCRAM channel binding is not supported on a plain connection")
        if cbind not in ("n", "y") or authzid:
            raise ProtocolViolation("08P01", "malformed SCRAM GS2 header")
        attrs = _attrs(bare)
        if attrs[0][0] == "m":
            raise ProtocolViolation("08P01", "SCRAM extensions are not supported")
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r" or not attrs[1][1]:
            raise ProtocolViolation("08P01", "malformed SCRAM client-first-message")
        self._client_first_bare = bare
        self._nonce = attrs[1][1] + self.server_nonce
        salt = base64.b64encode(self.v.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.v.iterations}"
        return self._server_first.encode()

    def client_final(self, data: bytes) -> bytes:
        if not self._server_first:
            raise ProtocolViolation("08P01", "SCRAM client-final-message before client-first-message")
        try:
            msg = data.decode()
        except UnicodeDecodeError:
            raise ProtocolViolation("08P01", "SCRAM message is not UTF-8") from None
        without_proof, sep, proof_b64 = msg.rpartition(",p=")
        if not sep:
            raise ProtocolViolation("08P01", "SCRAM client-final-message has no proof")
        attrs = dict(_attrs(without_proof))
        if attrs.get("c") not in ("biws", "eSws"):  # base64 of "n,," and "y,,"
            raise ProtocolViolation("08P01", "SCRAM channel binding does not match")
        if attrs.get("r") != self._nonce:
            raise ProtocolViolation("08P01", "SCRAM nonce does not match")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise ProtocolViolation("08P01", "malformed SCRAM proof") from None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.v.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthenticationFailed("wrong password")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.v.stored_key):
            raise AuthenticationFailed("wrong password")
        return b"v=" + base64.b64encode(_hmac(self.v.server_key, auth_message))


class ScramClient:
    """The client side, for tests and tools: first() -> final(server_first) -> verify(server_final)."""

    def __init__(self, password: str, client_nonce: str | None = None, user: str = ""):
        self.password = password
        self.nonce = client_nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n={user},r={self.nonce}"
        self._auth_message = b""
        self._server_key = b""

    def first(self) -> bytes:
        return f"n,,{self._bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(_attrs(server_first.decode()))
        if not attrs.get("r", "").startswith(self.nonce):
            raise ProtocolViolation("08P01", "server nonce does not extend ours")
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        client_key, self._server_key = _client_keys(self.password, salt, iterations)
        without_proof = f"c=biws,r={attrs['r']}"
        self._auth_message = f"{self._bare},{server_first.decode()},{without_proof}".encode()
        proof = _xor(client_key, _hmac(hashlib.sha256(client_key).digest(), self._auth_message))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        expected = b"v=" + base64.b64encode(_hmac(self._server_key, self._auth_message))
        if not hmac.compare_digest(server_final, expected):
            raise AuthenticationFailed("the server's signature does not match")
