"""The PostgreSQL check without a server: SCRAM against RFC 7677's example, md5, and scripted
conversations (what the server sends, what the check answers, the verdict)."""

from __future__ import annotations

import struct

import pytest

from l4proxy.checks import PASSED, Credentials, Failure, Verdict
from l4proxy.pgwire import Messages, PostgresCheck, Scram, md5_password, message, startup

RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_matches_rfc_7677() -> None:
    scram = Scram("pencil", RFC_NONCE, user="user")
    assert scram.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert scram.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert scram.verify(RFC_SERVER_FINAL)
    assert not scram.verify(b"v=AAAA")


@pytest.mark.parametrize(
    ("server_first", "problem"),
    [
        (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "the server's nonce does not extend ours"),
        (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999", "iteration count 99999999 (at most 100000)"),
    ],
)
def test_scram_refuses_a_bad_server_first_message(server_first: bytes, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        Scram("pencil", RFC_NONCE).final(server_first)
    assert str(caught.value) == problem


def test_md5_answer() -> None:
    """md5 of (hex md5 of password + user) + salt, prefixed ``md5``: the value libpq sends."""
    import hashlib

    inner = hashlib.md5(b"secretpostgres").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()
    assert md5_password("postgres", "secret", b"\x01\x02\x03\x04") == expected


def backend(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def auth(code: int, data: bytes = b"") -> bytes:
    return backend(b"R", struct.pack("!I", code) + data)


def status(name: str, value: str) -> bytes:
    return backend(b"S", f"{name}\0{value}\0".encode())


def error(code: str, text: str) -> bytes:
    return backend(b"E", f"SFATAL\0C{code}\0M{text}\0\0".encode())


READY = backend(b"Z", b"I")
TERMINATE = message(b"X", b"")
CREDENTIALS = Credentials("health", "pw", "app")


def test_startup_message() -> None:
    sent = startup("health", "app")
    assert struct.unpack_from("!II", sent) == (len(sent), 196608)
    assert sent[8:] == b"user\0health\0database\0app\0application_name\0l4proxy-health\0\0"


@pytest.mark.parametrize(
    ("primary", "replies", "answers", "verdict"),
    [
        (False, [auth(0) + status("in_hot_standby", "on") + READY], [TERMINATE], PASSED),
        (True, [auth(0) + status("in_hot_standby", "off") + READY], [TERMINATE], PASSED),
        (True, [auth(0) + status("in_hot_standby", "on") + READY], [TERMINATE],
         Verdict(Failure.WRONG_ROLE, "in hot standby (in_hot_standby=on)")),
        (True, [auth(0) + READY, backend(b"T", b"...") + backend(b"D", b"\0\1\0\0\0\1t")],
         [message(b"Q", b"SELECT pg_is_in_recovery()\0"), TERMINATE],
         Verdict(Failure.WRONG_ROLE, "in recovery (pg_is_in_recovery)")),
        (True, [auth(0) + READY, backend(b"D", b"\0\1\0\0\0\1f")], [message(b"Q", b"SELECT pg_is_in_recovery()\0"),
         TERMINATE], PASSED),
        (False, [auth(3), auth(0) + READY], [message(b"p", b"pw\0"), TERMINATE], PASSED),
        (False, [auth(5, b"salt")], [message(b"p", md5_password("health", "pw", b"salt") + b"\0")], None),
        (False, [error("28P01", 'password authentication failed for user "health"')], [b""],
         Verdict(Failure.AUTH_FAILED, 'FATAL 28P01 password authentication failed for user "health"')),
        (False, [error("3D000", 'database "app" does not exist')], [b""],
         Verdict(Failure.AUTH_FAILED, 'FATAL 3D000 database "app" does not exist')),
        (False, [error("57P03", "the database system is starting up")], [b""],
         Verdict(Failure.SERVER_ERROR, "FATAL 57P03 the database system is starting up")),
        (False, [auth(7)], [b""], Verdict(Failure.AUTH_FAILED, "unsupported authentication request 7")),
        (False, [auth(10, b"SCRAM-SHA-256-PLUS\0\0")], [b""],
         Verdict(Failure.AUTH_FAILED, "no supported SASL mechanism in [b'SCRAM-SHA-256-PLUS']")),
        (False, [b"HTTP/1.1 400 Bad Request\r\n"], [b""],
         Verdict(Failure.BAD_REPLY, "message b'H' of length 1414811695")),
        (False, [auth(0) + backend(b"W")], [TERMINATE], Verdict(Failure.BAD_REPLY, "unexpected message b'W'")),
    ],
)  # fmt: skip
def test_postgres_conversations(
    primary: bool, replies: list[bytes], answers: list[bytes], verdict: Verdict | None
) -> None:
    check = PostgresCheck(primary, CREDENTIALS, "nonce")
    check.start()
    steps = [check.feed(reply) for reply in replies]
    assert [sent for sent, _ in steps] == answers
    assert steps[-1][1] == verdict
    assert all(v is None for _, v in steps[:-1])


def test_postgres_scram_exchange_verifies_the_server() -> None:
    check = PostgresCheck(False, Credentials("user", "pencil", "db"), RFC_NONCE)
    check.start()
    sent, _ = check.feed(auth(10, b"SCRAM-SHA-256\0\0"))
    first = b"n,,n=,r=" + RFC_NONCE.encode()
    assert sent == message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    sent, _ = check.feed(auth(11, RFC_SERVER_FIRST))
    assert sent.startswith(message(b"p", b"")[:1]) and b"c=biws,r=" + RFC_SERVER_FIRST[2:50] in sent
    wrong = Verdict(Failure.AUTH_FAILED, "the server's SCRAM signature is wrong")
    assert check.feed(auth(12, b"v=AAAA")) == (b"", wrong)


def test_no_password_for_a_server_that_asks_for_one() -> None:
    check = PostgresCheck(False, Credentials("health", "", "app"), "n")
    check.start()
    assert check.feed(auth(10, b"SCRAM-SHA-256\0\0"))[1] == Verdict(
        Failure.AUTH_FAILED, "the server asks for a password; the credentials file has none"
    )


def test_messages_split_anywhere() -> None:
    stream = auth(0) + status("a", "b") + READY
    messages = Messages()
    got = [m for i in range(len(stream)) for m in messages.feed(stream[i : i + 1])]
    assert got == [(b"R", b"\0\0\0\0"), (b"S", b"a\0b\0"), (b"Z", b"I")]
