"""RESP replies and the redis checks as tables: what the member sends, the verdict it gets."""

from __future__ import annotations

import pytest

from l4proxy.checks import PASSED, Credentials, Failure, Verdict
from l4proxy.resp import ErrorReply, ProtocolError, RedisCheck, command, parse


@pytest.mark.parametrize(
    ("data", "parsed"),
    [
        (b"+PONG\r\n", ("PONG", 7)),
        (b"-WRONGPASS nope\r\n", (ErrorReply("WRONGPASS nope"), 17)),
        (b":-12\r\n", (-12, 6)),
        (b"$5\r\nhello\r\n", (b"hello", 11)),
        (b"$-1\r\n", (None, 5)),
        (b"*2\r\n$6\r\nmaster\r\n:0\r\n", ([b"master", 0], 20)),
        (b"*3\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n", None),  # incomplete
        (b"$5\r\nhel", None),
        (b"+PON", None),
    ],
)
def test_parse(data: bytes, parsed: object) -> None:
    assert parse(data) == parsed


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"HTTP/1.1 400\r\n", "unknown reply type b'H'"),
        (b"$x\r\n", "expected a number, got b'x'"),
        (b"$3\r\nabcde\r\n", "bulk string not followed by CRLF"),
        (b"$9999999\r\n", "bulk string of 9999999 bytes"),
        (b"+" + b"a" * 5000, "no line end within 4096 bytes"),
        (b"*1\r\n" * 6 + b":1\r\n", "replies nested too deep"),
    ],
)
def test_parse_refuses_what_is_not_resp(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(data)
    assert str(caught.value) == problem


def test_command() -> None:
    assert command("AUTH", "probe", "pä ss") == b"*3\r\n$4\r\nAUTH\r\n$5\r\nprobe\r\n$6\r\np\xc3\xa4 ss\r\n"


ROLE_MASTER = b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n"
ROLE_REPLICA = b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:14\r\n"


@pytest.mark.parametrize(
    ("primary", "credentials", "sent", "reply", "verdict"),
    [
        (False, None, b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", PASSED),
        (False, None, None, b"-NOAUTH Authentication required.\r\n",
         Verdict(Failure.AUTH_FAILED, "NOAUTH Authentication required.")),
        (False, None, None, b"-LOADING Redis is loading the dataset in memory\r\n",
         Verdict(Failure.SERVER_ERROR, "LOADING Redis is loading the dataset in memory")),
        (False, None, None, b":1\r\n", Verdict(Failure.BAD_REPLY, "to PING: 1")),
        (False, None, None, b"SSH-2.0\r\n", Verdict(Failure.BAD_REPLY, "unknown reply type b'S'")),
        (False, Credentials(password="pw"), b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*1\r\n$4\r\nPING\r\n",
         b"+OK\r\n+PONG\r\n", PASSED),
        (False, Credentials("u", "pw"), None, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
         Verdict(Failure.AUTH_FAILED, "WRONGPASS invalid username-password pair or user is disabled.")),
        (True, None, b"*1\r\n$4\r\nROLE\r\n", ROLE_MASTER, PASSED),
        (True, None, None, ROLE_REPLICA, Verdict(Failure.WRONG_ROLE, "slave")),
        (True, Credentials(password="pw"), None, b"+OK\r\n" + ROLE_REPLICA, Verdict(Failure.WRONG_ROLE, "slave")),
        (True, None, None, b"+OK\r\n", Verdict(Failure.BAD_REPLY, "to ROLE: 'OK'")),
    ],
)  # fmt: skip
def test_redis_checks(
    primary: bool, credentials: Credentials | None, sent: bytes | None, reply: bytes, verdict: Verdict
) -> None:
    check = RedisCheck(primary, credentials)
    request, early = check.start()
    assert early is None
    if sent is not None:
        assert request == sent
    for split in range(1, len(reply)):  # the verdict comes with the last byte, wherever the reply is cut
        again = RedisCheck(primary, credentials)
        again.start()
        assert again.feed(reply[:split]) == (b"", None) or verdict.failure is Failure.BAD_REPLY
    assert check.feed(reply) == (b"", verdict)


def test_redis_closed_or_stalled_mid_reply() -> None:
    check = RedisCheck(False)
    check.feed(b"+PO")
    assert check.stalled() == Verdict(Failure.BAD_REPLY, "incomplete reply b'+PO'")
    assert check.closed() == Verdict(Failure.BAD_REPLY, "closed before replying (b'+PO')")
    assert RedisCheck(False).stalled() is None
