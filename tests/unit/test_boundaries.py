"""The safe-moment watches of ``--drain-at safe`` as tables: a script of chunks each way, starting
mid-stream, and whether the session may close after each server chunk. Pure: no sockets."""

from __future__ import annotations

import struct

import pytest

from l4proxy.boundaries import FRONTEND_TYPES, Commands, Frames, PostgresWatch, RedisWatch, Replies, watch_for


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def rfq(status: bytes) -> bytes:
    return msg(b"Z", status)


def done(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


EXTENDED_UPDATE = msg(b"P", b"\0UPDATE t\0\0\0") + msg(b"B", b"\0\0" + b"\0" * 6) + msg(b"E", b"\0\0\0\0\0")
ROW = msg(b"D", b"\0\x01\0\0\0\x03abc")

# (direction, bytes) steps; after each server step the expected verdict. "c": client, "s": server.
Script = list[tuple[str, bytes, bool | None]]

PG_SCRIPTS: dict[str, Script] = {
    "a transaction in flight at the start: safe after its COMMIT, not before": [
        ("s", done(b"UPDATE 1") + rfq(b"T"), False),  # where the server waits: the start
        ("c", query(b"SELECT 1"), None),
        ("s", msg(b"T", b"\0\x01" + b"x" * 19) + ROW + done(b"SELECT 1") + rfq(b"T"), False),
        ("c", query(b"COMMIT"), None),
        ("s", done(b"COMMIT") + rfq(b"I"), True),
    ],
    "idle at the start: safe after the next request's answer": [
        ("s", rfq(b"I"), False),  # the start: but what the client sent before is unknown
        ("c", query(b"SELECT 1"), None),
        ("s", ROW + done(b"SELECT 1") + rfq(b"I"), True),
    ],
    "a server chunk that does not end at ReadyForQuery is no start": [
        ("s", ROW + ROW, False),
        ("c", query(b"SELECT 1"), None),  # not framed: the client's stream has no known start yet
        ("s", ROW + done(b"SELECT 2") + rfq(b"I"), False),  # the start
        ("c", query(b"SELECT 1"), None),
        ("s", done(b"SELECT 1") + rfq(b"I"), True),
    ],
    "the extended protocol: a Sync is the request; before it the exchange is open": [
        ("s", rfq(b"I"), False),
        ("c", EXTENDED_UPDATE, None),
        ("s", msg(b"1") + msg(b"2") + done(b"UPDATE 1"), False),
        ("c", msg(b"S"), None),
        ("s", rfq(b"I"), True),
    ],
    "a pipelining client: two Syncs, two answers; safe only after the second": [
        ("s", rfq(b"I"), False),
        ("c", EXTENDED_UPDATE + msg(b"S") + EXTENDED_UPDATE + msg(b"S"), None),
        ("s", msg(b"1") + msg(b"2") + done(b"UPDATE 1") + rfq(b"I"), False),
        ("s", msg(b"1") + msg(b"2") + done(b"UPDATE 1") + rfq(b"I"), True),
    ],
    "in a failed transaction (E) and in a transaction (T): not safe": [
        ("s", rfq(b"I"), False),
        ("c", query(b"BEGIN"), None),
        ("s", done(b"BEGIN") + rfq(b"T"), False),
        ("c", query(b"SELEC"), None),
        ("s", msg(b"E", b"SERROR\0C42601\0\0") + rfq(b"E"), False),
        ("c", query(b"ROLLBACK"), None),
        ("s", done(b"ROLLBACK") + rfq(b"I"), True),
    ],
    "a message split across chunks, a big row skipped, a notice after ReadyForQuery": [
        ("s", rfq(b"I"), False),
        ("c", query(b"SELECT big")[:3], None),
        ("c", query(b"SELECT big")[3:], None),
        ("s", msg(b"D", b"\0\x01" + b"x" * 70000)[:40000], False),
        ("s", msg(b"D", b"\0\x01" + b"x" * 70000)[40000:] + done(b"SELECT 1") + rfq(b"I")[:3], False),
        ("s", rfq(b"I")[3:], True),
        ("s", msg(b"N", b"SNOTICE\0\0"), False),  # the last message is no longer ReadyForQuery
    ],
    "COPY FROM STDIN inside one Query": [
        ("s", rfq(b"I"), False),
        ("c", query(b"COPY t FROM STDIN"), None),
        ("s", msg(b"G", b"\0\0\0"), False),
        ("c", msg(b"d", b"1\n") + msg(b"c"), None),
        ("s", done(b"COPY 1") + rfq(b"I"), True),
    ],
    "garbage from the client puts the watch back to looking for a start": [
        ("s", rfq(b"I"), False),
        ("c", b"\x16\x03\x01\x02\x00", None),  # a TLS ClientHello is no frontend message
        ("s", done(b"SELECT 1") + rfq(b"I"), False),  # only a new start
        ("c", query(b"SELECT 1"), None),
        ("s", done(b"SELECT 1") + rfq(b"I"), True),
    ],
    "more answers than requests (the client pipelined across the start): back to looking": [
        ("s", rfq(b"T"), False),
        ("c", query(b"SELECT 1"), None),
        ("s", rfq(b"T") + rfq(b"I"), False),
        ("c", query(b"SELECT 1"), None),
        ("s", rfq(b"I"), False),  # the new start
        ("c", query(b"SELECT 1"), None),
        ("s", rfq(b"I"), True),
    ],
}

REDIS_SCRIPTS: dict[str, Script] = {
    "a plain command at the client's turn: safe after its reply": [
        ("s", b"+OK\r\n", False),
        ("c", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", None),
        ("s", b"$5\r\nhello\r\n", True),
    ],
    "MULTI ... EXEC: never inside": [
        ("s", b":1\r\n", False),
        ("c", b"*1\r\n$5\r\nMULTI\r\n", None),
        ("s", b"+OK\r\n", False),
        ("c", b"*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n", None),
        ("s", b"+QUEUED\r\n", False),
        ("c", b"*1\r\n$4\r\nEXEC\r\n", None),
        ("s", b"*1\r\n", False),
        ("s", b":1\r\n", True),
    ],
    "a pipelined batch: safe only once every reply is in": [
        ("s", b"+OK\r\n", False),
        ("c", b"*1\r\n$4\r\nPING\r\n" * 3, None),
        ("s", b"+PONG\r\n+PONG\r\n", False),
        ("s", b"+PONG\r\n", True),
    ],
    "a blocking command is unanswered until it returns": [
        ("s", b"+OK\r\n", False),
        ("c", b"*3\r\n$5\r\nBLPOP\r\n$1\r\nq\r\n$1\r\n0\r\n", None),
        ("s", b"*2\r\n$1\r\nq\r\n", False),
        ("s", b"$1\r\nv\r\n", True),
    ],
    "WATCH holds a transaction open until EXEC, DISCARD or UNWATCH": [
        ("s", b"+OK\r\n", False),
        ("c", b"*2\r\n$5\r\nWATCH\r\n$1\r\nk\r\n", None),
        ("s", b"+OK\r\n", False),
        ("c", b"*1\r\n$7\r\nUNWATCH\r\n", None),
        ("s", b"+OK\r\n", True),
    ],
    "a subscription is never safe": [
        ("s", b"+OK\r\n", False),
        ("c", b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n", None),
        ("s", b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n", False),
        ("c", b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$1\r\nc\r\n", None),
        ("s", b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nc\r\n:0\r\n", False),
    ],
    "the client's first chunk before any server byte is not its turn: no start": [
        ("c", b"*1\r\n$4\r\nPING\r\n", None),
        ("s", b"+PONG\r\n", False),
        ("c", b"*1\r\n$4\r\nPING\r\n", None),
        ("s", b"+PONG\r\n", True),
    ],
    "RESP3: a push is not a reply, an attribute comes before one; maps, sets, doubles": [
        ("s", b"+OK\r\n", False),
        ("c", b"*2\r\n$7\r\nHGETALL\r\n$1\r\nh\r\n", None),
        ("s", b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n", False),
        ("s", b"|1\r\n+ttl\r\n:3\r\n%1\r\n+f\r\n,1.5\r\n", True),
        ("c", b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", None),
        ("s", b"~1\r\n_\r\n", False),
        ("s", b"#t\r\n", True),
    ],
    "inline commands count too; a big value is skipped, split anywhere": [
        ("s", b"+OK\r\n", False),
        ("c", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n" + b"v" * 50000, None),
        ("c", b"v" * 50000 + b"\r\nPING\r\n", None),
        ("s", b"+OK\r", False),
        ("s", b"\n+PONG\r\n", True),
    ],
    "garbage from the server puts the watch back to looking for a start": [
        ("s", b"+OK\r\n", False),
        ("c", b"*1\r\n$4\r\nPING\r\n", None),
        ("s", b"\x17\x03\x03garbage\r\n", False),
        ("c", b"*1\r\n$4\r\nPING\r\n", None),
        ("s", b"+PONG\r\n", True),
    ],
    "a MULTI opened before the start shows in +QUEUED; EXEC ends it": [
        ("s", b"+OK\r\n", False),
        ("c", b"INCR x\r\n", None),
        ("s", b"+QUEUED\r\n", False),
        ("c", b"EXEC\r\n", None),
        ("s", b"*1\r\n:1\r\n", True),
    ],
    "a subscription made before the start shows in its replies: never safe": [
        ("s", b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", False),
        ("c", b"PING\r\n", None),
        ("s", b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", False),
    ],
    "CLIENT REPLY turns the count off: never safe again": [
        ("s", b"+OK\r\n", False),
        ("c", b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n", None),
        ("c", b"*1\r\n$4\r\nPING\r\n", None),
        ("s", b"+PONG\r\n", False),
    ],
}


def run(watch: PostgresWatch | RedisWatch, script: Script) -> list[bool]:
    verdicts = []
    for side, data, _ in script:
        if side == "c":
            watch.client(data)
        else:
            verdicts.append(watch.server(data))
    return verdicts


@pytest.mark.parametrize("name", list(PG_SCRIPTS))
def test_postgres_safe_moments(name: str) -> None:
    script = PG_SCRIPTS[name]
    assert run(PostgresWatch(), script) == [v for side, _, v in script if side == "s"]


@pytest.mark.parametrize("name", list(REDIS_SCRIPTS))
def test_redis_safe_moments(name: str) -> None:
    script = REDIS_SCRIPTS[name]
    assert run(RedisWatch(), script) == [v for side, _, v in script if side == "s"]


def test_a_script_fed_byte_by_byte_reaches_the_same_last_verdict() -> None:
    """Chunking changes where the starts fall, never the framing once it has started."""
    watch = RedisWatch()
    watch.server(b"+OK\r\n")
    for byte in b"*1\r\n$4\r\nPING\r\n":
        watch.client(bytes([byte]))
    reply = b"*2\r\n$1\r\na\r\n%1\r\n+x\r\n:1\r\n"
    verdicts = [watch.server(bytes([byte])) for byte in reply]
    assert verdicts == [False] * (len(reply) - 1) + [True]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (msg(b"Q", b"x\0") + msg(b"S"), [(ord("Q"), ord("x")), (ord("S"), -1)]),
        (b"S\0\0\0\x04", [(ord("S"), -1)]),
    ],
)
def test_frames(data: bytes, expected: list[tuple[int, int]]) -> None:
    frames = Frames(FRONTEND_TYPES)
    assert frames.feed(data) == expected and frames.boundary


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"Z\0\0\0\x05I", "message type b'Z'"), (b"Q\0\0\0\x03", "message length 3")],
)
def test_frames_refuse_what_the_direction_does_not_send(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        Frames(FRONTEND_TYPES).feed(data)


def test_replies_and_commands_count_whole_values_only() -> None:
    replies = Replies()
    replies.feed(b"*2\r\n*1\r\n:1\r\n$-1\r\n*-1\r\n$3\r\nab")
    assert (replies.count, replies.boundary) == (2, False)
    replies.feed(b"c\r\n")
    assert (replies.count, replies.boundary) == (3, True)
    commands = Commands()
    assert commands.feed(b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\nping extra words\r\n") == [
        (b"SET", b"K"),
        (b"PING", b"EXTRA"),
    ]


def test_watch_for_names_the_protocol() -> None:
    assert isinstance(watch_for("postgres"), PostgresWatch)
    assert isinstance(watch_for("redis"), RedisWatch)
