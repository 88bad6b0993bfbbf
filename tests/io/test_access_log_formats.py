"""The access log's formats and targets: JSON lines against the committed schema, RFC 5424 syslog over
UDP and a UNIX datagram socket, and the logfmt line unchanged.

JSON lines come from real sessions on loopback (a served one, one retried past a refusing member, one
with no upstream at all) and are validated with ``jsonschema`` against ``docs/access-log.schema.json``;
the record's values are checked exactly where they are known. Syslog messages are read from real
sockets and their RFC 5424 header is parsed field by field.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from l4proxy import Address, Proxy
from l4proxy.accesslog import AccessLog, json_record, split_cause, stamp, syslog_header, syslog_hostname
from l4proxy.config import syslog_target
from l4proxy.errors import ConfigError
from l4proxy.peer import Carried
from l4proxy.syslogsink import SyslogAccessLog, open_log

from ..kit import connect, eventually, make_config, refused_address, roundtrip, running, upstreams

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "access-log.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())

# RFC 5424 section 6: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<timestamp>\S+) (?P<hostname>[!-~]{1,255})"
    r" (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) (?P<sd>-|\[.*?\])(?: (?P<msg>.*))?$",
    re.DOTALL,
)
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")


def valid(line: str) -> dict[str, Any]:
    """The record of a JSON line, once the schema has accepted it."""
    record = json.loads(line)
    VALIDATOR.validate(record)
    return record


# --- pure: the record, the header, the target ------------------------------------------------------


def fake(**overrides: Any) -> Any:
    """A finished session as ``accesslog.Finished`` sees one."""
    facts: dict[str, Any] = {
        "started": 1764620469.1235,  # half a millisecond in: floating point cannot round it down
        "member": SimpleNamespace(name="10.0.0.5:6379"),
        "client": SimpleNamespace(nbytes=120),
        "upstream": SimpleNamespace(nbytes=4096),
        "end_cause": "eof",
        "client_address": ("127.0.0.1", 51234),
        "tls_info": None,
        "limits": SimpleNamespace(name="default", pool="default"),
    }
    return SimpleNamespace(**{**facts, **overrides})


BASE = {
    "schema": 1,
    "start": "2025-12-01T20:21:09.123Z",
    "end": "2025-12-01T20:21:09.655Z",
    "duration": 0.532,
    "client": "127.0.0.1:51234",
    "listener": "default",
    "pool": "default",
    "member": "10.0.0.5:6379",
    "bytes_in": 120,
    "bytes_out": 4096,
    "connect_time": None,
    "attempts": 0,
    "retries": 0,
    "end_cause": "eof",
    "end_detail": None,
    "tls": None,
    "worker": None,
}

RECORDS = [
    ("a plain session", {}, None, {}),
    (
        "timed: two attempts, the second connected",
        {"tried": [1, 2], "connect_time": 0.0123456789},
        None,
        {"attempts": 2, "retries": 1, "connect_time": 0.012346},
    ),
    (
        "no upstream: the cause split from its detail",
        {"member": None, "upstream": None, "end_cause": "no_upstream (connect failed: refused)", "tried": [1, 2, 3]},
        None,
        {"member": None, "bytes_out": 0, "end_cause": "no_upstream", "end_detail": "connect failed: refused"}
        | {"attempts": 3, "retries": 2},
    ),
    ("an unset cause is eof", {"end_cause": ""}, None, {}),
    (
        "IPv6, carried by a PROXY header, in a worker",
        {"client_address": Carried("2001:db8::7", 443, None), "limits": SimpleNamespace(name="edge", pool="web")},
        3,
        {"client": "[2001:db8::7]:443", "listener": "edge", "pool": "web", "worker": 3},
    ),
    (
        "TLS: every fact, absent ones null",
        {"tls_info": {"tls_sni": "a.example", "tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_128_GCM_SHA256"}},
        None,
        {"tls": {"sni": "a.example", "version": "TLSv1.3", "alpn": None, "cipher": "TLS_AES_128_GCM_SHA256"}
         | {"peer_cn": None}},
    ),
]


@pytest.mark.parametrize(("overrides", "worker", "changes"), [r[1:] for r in RECORDS], ids=[r[0] for r in RECORDS])
def test_json_records_hold_every_key_and_validate(overrides: dict[str, Any], worker: int | None,
                                                  changes: dict[str, Any]) -> None:  # fmt: skip
    session = fake(**overrides)
    record = json_record(session, session.started + 0.532, worker)
    assert record == BASE | changes
    assert list(record) == SCHEMA["required"]  # always every key, in the documented order
    VALIDATOR.validate(record)
    line = AccessLog(None, fmt="json", worker=worker).format_json(session, session.started + 0.532)
    assert json.loads(line) == record and "\n" not in line


def test_the_schema_refuses_what_the_proxy_never_writes() -> None:
    for broken in (
        BASE | {"end_cause": "exploded"},
        BASE | {"bytes_in": -1},
        BASE | {"start": "2025-12-01 20:21:09"},
        BASE | {"extra": 1},
        {k: v for k, v in BASE.items() if k != "worker"},
        BASE | {"tls": {"sni": "x"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(broken)


@pytest.mark.parametrize(
    ("cause", "split"),
    [("eof", ("eof", None)), ("no_upstream (refused)", ("no_upstream", "refused")),
     ("no_upstream (connect failed: timeout (5s))", ("no_upstream", "connect failed: timeout (5s)"))],
)  # fmt: skip
def test_causes_split_into_word_and_detail(cause: str, split: tuple[str, str | None]) -> None:
    assert split_cause(cause) == split


def test_the_logfmt_line_is_unchanged() -> None:
    line = AccessLog(None).format(fake(), fake().started + 0.532)
    assert line == (
        "2025-12-01T20:21:09.123Z client=127.0.0.1:51234 upstream=10.0.0.5:6379 in=120 out=4096 duration=0.532s end=eof"
    )
    assert stamp(fake().started) == line.split()[0]


def test_the_syslog_header_is_rfc_5424() -> None:
    message = syslog_header(1764620469.5, syslog_hostname("db-1.example"), 4242) + "client=x"
    fields = RFC5424.match(message)
    assert fields is not None
    assert fields.groupdict() == {
        "pri": "134", "version": "1", "timestamp": "2025-12-01T20:21:09.500Z", "hostname": "db-1.example",
        "app": "l4proxy", "procid": "4242", "msgid": "access", "sd": "-", "msg": "client=x",
    }  # fmt: skip
    assert syslog_hostname("") == "-" and syslog_hostname("a b\tc") == "abc" and len(syslog_hostname("h" * 300)) == 255


@pytest.mark.parametrize(
    ("text", "target"),
    [("syslog:/dev/log", "/dev/log"), ("syslog:127.0.0.1:514", ("127.0.0.1", 514)),
     ("syslog:[::1]:5514", ("::1", 5514)), ("syslog:logs.example:514", ("logs.example", 514))],
)  # fmt: skip
def test_syslog_targets(text: str, target: object) -> None:
    assert syslog_target(text) == target


@pytest.mark.parametrize("text", ["syslog:", "syslog:host", "syslog:host:0", "syslog:host:70000", "syslog::514",
                                  "syslog:host:5x"])  # fmt: skip
def test_bad_syslog_targets_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config([Address("127.0.0.1", 1)], access_log=text)
    assert str(caught.value) == (
        f"access_log {text!r}: expected syslog:HOST:PORT (UDP, port 1..65535) or syslog:/PATH (a UNIX datagram socket)"
    )


def test_a_bad_format_names_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        make_config([Address("127.0.0.1", 1)], access_log_format="xml")
    assert str(caught.value) == "access_log_format 'xml': expected one of logfmt, json"


# --- real sessions ---------------------------------------------------------------------------------


async def test_json_lines_of_real_sessions_validate_and_hold_their_facts() -> None:
    dead = refused_address()
    async with upstreams(1) as [live]:
        config = make_config([dead, live.address], retries=1)
        async with running(config, fmt="json") as (proxy, log):
            assert await roundtrip(proxy.port(), b"x" * 1000) == b"x" * 1000  # dead first, then live
            await log.wait_for(1)
        async with running(make_config([dead], retries=1), fmt="json") as (proxy, none):
            reader, writer = await connect(proxy.port())
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await none.wait_for(1)
    served, failed = valid(log.lines[0]), valid(none.lines[0])
    assert (served["member"], served["bytes_in"], served["bytes_out"]) == (str(live.address), 1000, 1000)
    assert (served["attempts"], served["retries"], served["end_cause"], served["end_detail"]) == (2, 1, "eof", None)
    assert 0 < served["connect_time"] <= served["duration"]
    assert served["client"].startswith("127.0.0.1:") and served["tls"] is None and served["worker"] is None
    assert (failed["member"], failed["connect_time"], failed["attempts"], failed["retries"]) == (None, None, 2, 1)
    assert (failed["end_cause"], failed["end_detail"]) == ("no_upstream", "refused")


async def test_a_file_target_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    async with upstreams(1) as [live]:
        config = make_config([live.address], access_log=str(path), access_log_format="json")
        async with Proxy(config) as proxy:
            for _ in range(3):
                assert await roundtrip(proxy.port(), b"ping") == b"ping"
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert {valid(line)["bytes_in"] for line in lines} == {4}


# --- syslog ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def receiver(family: socket.AddressFamily, where: Any) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(where)
        sock.settimeout(5)
        yield sock
    finally:
        sock.close()


def header_of(datagram: bytes) -> dict[str, str]:
    fields = RFC5424.match(datagram.decode())
    assert fields is not None, datagram
    found = fields.groupdict()
    assert (found["pri"], found["version"], found["app"], found["msgid"], found["sd"]) == (
        "134", "1", "l4proxy", "access", "-"
    )  # fmt: skip
    assert found["procid"] == str(os.getpid()) and found["hostname"] == syslog_hostname(socket.gethostname())
    assert TIMESTAMP.match(found["timestamp"])
    return found


async def test_syslog_over_udp_sends_one_rfc_5424_message_per_session() -> None:
    with receiver(socket.AF_INET, ("127.0.0.1", 0)) as sink:
        target = f"syslog:127.0.0.1:{sink.getsockname()[1]}"
        async with upstreams(1) as [live], Proxy(make_config([live.address], access_log=target)) as proxy:
            before = time.time()
            assert await roundtrip(proxy.port(), b"hello") == b"hello"
            datagram = await asyncio.to_thread(sink.recv, 65536)
    found = header_of(datagram)
    sent = calendar.timegm(time.strptime(found["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert before - 1 <= sent <= time.time()
    msg = found["msg"]
    assert re.fullmatch(rf"\S+Z client=127\.0\.0\.1:\d+ upstream={live.address} in=5 out=5 duration=\S+s end=eof", msg)


async def test_syslog_over_a_unix_datagram_socket_carries_json(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with receiver(socket.AF_UNIX, path) as sink:
        async with upstreams(1) as [live]:
            config = make_config([live.address], access_log=f"syslog:{path}", access_log_format="json")
            async with Proxy(config) as proxy:
                assert await roundtrip(proxy.port(), b"hi there") == b"hi there"
                datagram = await asyncio.to_thread(sink.recv, 65536)
    record = valid(header_of(datagram)["msg"])
    assert (record["member"], record["bytes_in"], record["end_cause"]) == (str(live.address), 8, "eof")


async def test_a_syslog_receiver_that_went_away_costs_lines_not_the_proxy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "log.sock")
    with receiver(socket.AF_UNIX, path):
        access = open_log(f"syslog:{path}")
    os.unlink(path)  # the daemon is gone; its socket with it
    assert isinstance(access, SyslogAccessLog)
    async with upstreams(1) as [live], Proxy(make_config([live.address]), access) as proxy:
        assert await roundtrip(proxy.port(), b"still served") == b"still served"
        assert await roundtrip(proxy.port(), b"and again") == b"and again"
        await eventually(lambda: access.records == 2)
        with receiver(socket.AF_UNIX, path) as sink:  # a new daemon at the same path
            access.flush()  # the tick: reports the loss, connects again
            assert await roundtrip(proxy.port(), b"back") == b"back"
            record = await asyncio.to_thread(sink.recv, 65536)
    assert access.records == 3
    assert header_of(record)["msg"].endswith("end=eof") and " in=4 " in record.decode()
    lost = re.findall(rf"access log: (\d+) lines? not sent to syslog:{re.escape(path)}: ", caplog.text)
    assert sum(map(int, lost)) == 2  # one report, or two if the proxy's own tick came in between


def test_an_unreachable_syslog_socket_is_an_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_log(f"syslog:{tmp_path}/nothing-here")


# --- workers and diagnostics -----------------------------------------------------------------------


def test_a_workers_json_lines_carry_it_as_a_key_and_its_logfmt_lines_at_the_end(tmp_path: Path) -> None:
    from l4proxy.workers import WorkerAccessLog

    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for fmt in ("json", "logfmt"):
            log = WorkerAccessLog(fd, 3, fmt)
            log.record(fake(), time.time())
            log.close()
    finally:
        os.close(fd)
    as_json, as_logfmt = path.read_text().splitlines()
    assert valid(as_json)["worker"] == 3
    assert as_logfmt.endswith(" end=eof worker=3")


def test_a_workers_syslog_lines_name_it(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with receiver(socket.AF_UNIX, path) as sink:
        access = open_log(f"syslog:{path}")
        assert isinstance(access, SyslogAccessLog)
        access.for_worker(2).record(fake(), time.time())
        datagram = sink.recv(65536)
        access.close()
    assert header_of(datagram)["msg"].endswith(" end=eof worker=2")


def test_diagnostics_are_stamped_like_the_access_log() -> None:
    import logging

    from l4proxy.cli import _Stamped

    record = logging.LogRecord("l4proxy", logging.INFO, __file__, 1, "listening", None, None)
    record.created = fake().started
    record.msecs = (record.created - int(record.created)) * 1000
    line = _Stamped("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
    assert line == "2025-12-01T20:21:09.123Z INFO l4proxy: listening"
