"""The PostgreSQL wire protocol (v3) for health checks, and the ``postgres``/``postgres-primary`` check
as a conversation (``checks.Conversation``).

The check is a real login: a StartupMessage with the user and database of the credentials file, then
whatever authentication the server asks for (trust, cleartext, md5, SCRAM-SHA-256 with the server's
signature verified), until ReadyForQuery. ``postgres`` passes there. ``postgres-primary`` passes only
while the server is not in recovery: the ``in_hot_standby`` ParameterStatus says so on PostgreSQL 14+;
without it the check asks ``SELECT pg_is_in_recovery()``. It ends with Terminate either way.

Written by hand rather than with a driver: the exchange is a handful of messages, and asyncpg would
cost every l4proxy process about 5 MiB and 21 ms of imports (measured) for them, plus a compiled
dependency. Passwords are used as UTF-8 without SASLprep, which is the same for ASCII passwords.
The SCRAM key derivation (PBKDF2) is cached by salt and iteration count, so only the first probe of a
member pays for it; a server asking for more than ``MAX_ITERATIONS`` fails the check instead of
stalling the event loop.

Pure: no sockets, no event loop; the client nonce is an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

from .checks import PASSED, Credentials, Failure, Step, Verdict

PROTOCOL = 196608  # 3.0
MAX_MESSAGE = 1 << 20
MAX_ITERATIONS = 100_000
RECOVERY_QUERY = "SELECT pg_is_in_recovery()"
AUTH_SQLSTATES = ("28", "3D000")  # invalid authorization (wrong password, no such role), no such database


def message(kind: bytes, body: bytes) -> bytes:
    """A frontend message: type byte, length (itself included), body."""
    return kind + struct.pack("!I", len(body) + 4) + body


def startup(user: str, database: str) -> bytes:
    params = {"user": user, "database": database, "application_name": "l4proxy-health"}
    body = struct.pack("!I", PROTOCOL) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The md5 answer: ``md5`` + md5(hex(md5(password + user)) + salt), as hex."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, by their one-letter code."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode("ascii", "replace")] = part[1:].decode("utf-8", "replace")
    return fields


class Messages:
    """Splits the backend's byte stream into (type, body) messages."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The messages completed by ``data``; raises ValueError on a length no message has."""
        self.buf += data
        out = []
        while len(self.buf) >= 5:
            (size,) = struct.unpack_from("!I", self.buf, 1)
            if not 4 <= size <= MAX_MESSAGE:
                raise ValueError(f"message {self.buf[:1]!r} of length {size}")
            if len(self.buf) < size + 1:
                break
            out.append((self.buf[:1], self.buf[5 : size + 1]))
            self.buf = self.buf[size + 1 :]
        return out


class Scram:
    """The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding."""

    def __init__(
        self, password: str, nonce: str, keys: dict[tuple[bytes, int], bytes] | None = None, user: str = ""
    ) -> None:
        self.password = password.encode("utf-8")
        self.nonce = nonce
        self.keys = {} if keys is None else keys  # salted passwords by (salt, iterations)
        self.first_bare = f"n={user},r={nonce}"  # PostgreSQL takes the user from the startup message
        self.server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self.first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        """The client-final message for the server-first message; raises ValueError on a bad one."""
        attrs = _attributes(server_first)
        nonce, salt, iterations = attrs.get("r", ""), base64.b64decode(attrs.get("s", "")), int(attrs.get("i", "0"))
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ValueError("the server's nonce does not extend ours")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"iteration count {iterations} (at most {MAX_ITERATIONS})")
        salted = self.keys.get((salt, iterations))
        if salted is None:
            salted = self.keys[salt, iterations] = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> bool:
        """Whether the server proved it knows the password too."""
        attrs = _attributes(server_final)
        return "v" in attrs and hmac.compare_digest(base64.b64decode(attrs["v"]), self.server_signature)


def _attributes(data: bytes) -> dict[str, str]:
    try:
        text = data.decode("ascii")
        return {part[0]: part[2:] for part in text.split(",") if len(part) >= 2 and part[1] == "="}
    except (UnicodeDecodeError, IndexError):
        raise ValueError("not a SCRAM message") from None


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class PostgresCheck:
    """``postgres`` (a full login) or ``postgres-primary`` (a login, then not in recovery)."""

    def __init__(
        self, primary: bool, credentials: Credentials, nonce: str, keys: dict[tuple[bytes, int], bytes] | None = None
    ) -> None:
        self.primary = primary
        self.credentials = credentials
        self.scram = Scram(credentials.password, nonce, keys)
        self.messages = Messages()
        self.parameters: dict[str, str] = {}
        self.querying = False
        self.logged_in = False  # authentication passed: say Terminate before hanging up

    def start(self) -> Step:
        return startup(self.credentials.user, self.credentials.database), None

    def feed(self, data: bytes) -> Step:
        try:
            out = b""
            for kind, body in self.messages.feed(data):
                send, verdict = self._on(kind, body)
                out += send
                if verdict is not None:
                    return out + (message(b"X", b"") if self.logged_in else b""), verdict
            return out, None
        except (ValueError, struct.error, IndexError) as exc:
            return b"", Verdict(Failure.BAD_REPLY, str(exc) or type(exc).__name__)

    def _on(self, kind: bytes, body: bytes) -> Step:
        if kind == b"R":
            return self._authenticate(body)
        if kind == b"E":
            fields = error_fields(body)
            code = fields.get("C", "")
            failure = Failure.AUTH_FAILED if code.startswith(AUTH_SQLSTATES) else Failure.SERVER_ERROR
            return b"", Verdict(failure, f"{fields.get('S', 'ERROR')} {code} {fields.get('M', '')}".strip())
        if kind == b"S":
            name, value, _ = body.split(b"\0", 2)
            self.parameters[name.decode()] = value.decode()
            return b"", None
        if kind == b"Z":
            return self._ready()
        if kind == b"D" and self.querying:
            (columns,) = struct.unpack_from("!H", body)
            (size,) = struct.unpack_from("!i", body, 2)
            value = body[6 : 6 + size] if columns == 1 and size >= 0 else b""
            if value not in (b"t", b"f"):
                return b"", Verdict(Failure.BAD_REPLY, f"pg_is_in_recovery() gave {value!r}")
            return b"", Verdict(Failure.WRONG_ROLE, "in recovery (pg_is_in_recovery)") if value == b"t" else PASSED
        if kind in (b"K", b"N", b"T", b"C") or (kind == b"I" and self.querying):
            return b"", None  # BackendKeyData, notices, RowDescription, CommandComplete: nothing to judge
        return b"", Verdict(Failure.BAD_REPLY, f"unexpected message {kind!r}")

    def _authenticate(self, body: bytes) -> Step:
        (code,) = struct.unpack_from("!I", body)
        password = self.credentials.password
        if code == 0:
            self.logged_in = True
            return b"", None
        if code in (3, 5, 10) and not password:
            return b"", Verdict(Failure.AUTH_FAILED, "the server asks for a password; the credentials file has none")
        if code == 3:
            return message(b"p", password.encode() + b"\0"), None
        if code == 5:
            return message(b"p", md5_password(self.credentials.user, password, body[4:8]) + b"\0"), None
        if code == 10:
            mechanisms = body[4:].split(b"\0")
            if b"SCRAM-SHA-256" not in mechanisms:
                return b"", Verdict(Failure.AUTH_FAILED, f"no supported SASL mechanism in {mechanisms[:-2]!r}")
            first = self.scram.first()
            return message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first), None
        if code == 11:
            return message(b"p", self.scram.final(body[4:])), None
        if code == 12:
            if not self.scram.verify(body[4:]):
                return b"", Verdict(Failure.AUTH_FAILED, "the server's SCRAM signature is wrong")
            return b"", None
        return b"", Verdict(Failure.AUTH_FAILED, f"unsupported authentication request {code}")

    def _ready(self) -> Step:
        if self.querying:
            return b"", Verdict(Failure.BAD_REPLY, "no row from pg_is_in_recovery()")
        if not self.primary:
            return b"", PASSED
        standby = self.parameters.get("in_hot_standby")
        if standby is None:  # before PostgreSQL 14: ask
            self.querying = True
            return message(b"Q", RECOVERY_QUERY.encode() + b"\0"), None
        if standby == "off":
            return b"", PASSED
        return b"", Verdict(Failure.WRONG_ROLE, f"in hot standby (in_hot_standby={standby})")

    def closed(self) -> Verdict:
        return Verdict(Failure.BAD_REPLY, "closed before ReadyForQuery")

    def stalled(self) -> Verdict | None:
        return None
