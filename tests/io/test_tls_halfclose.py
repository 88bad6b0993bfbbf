"""Half-close through TLS sides, and TLS 1.3 upstreams that reject us only after the handshake.

RELIABILITY.md case 3 (a TLS side half-closes with close_notify) on every combination of plain and TLS
sides, each direction first, TLS 1.2 and 1.3; and case 27 for the late alert (a member that requires a
client certificate we do not have says so after a TLS 1.3 handshake): the attempt fails, counted as a
TLS failure, and the client is served by the next member. The peers are blocking sockets in threads
(Python's ``ssl``, so OpenSSL, on the far ends) and ``openssl s_server``: they half-close exactly as
asked, close_notify then reading on, which asyncio's TLS streams cannot.
"""


from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from l4proxy import Address, tlsengine
from l4proxy.config import UpstreamTLSConfig
from l4proxy.tlsengine import confirm_wait

from ..kit import PKI, eventually, make_config, running

TIMEOUT = 10.0
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
REQUEST = os.urandom(100_000)
REPLY = os.urandom(300_000)  # more than the proxy buffers: the half-closed direction flushes under backpressure


class End:
    """One end of a connection, plain or TLS, blocking with a timeout."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLSocket | None = None) -> None:
        self.sock: socket.socket = tls or sock  # wrap_socket detaches the plain socket: this one owns the fd
        self.tls = tls

    def send(self, data: bytes) -> None:
        (self.tls or self.sock).sendall(data)

    def half_close(self) -> None:
        """FIN, or close_notify without waiting for the peer's (which a blocking ``unwrap`` would)."""
        if self.tls is None:
            self.sock.shutdown(socket.SHUT_WR)
            return
        self.tls.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self.tls.settimeout(TIMEOUT)

    def read_to_eof(self) -> bytes:
        """Everything until the peer's FIN or close_notify."""
        conn = self.tls or self.sock
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except ssl.SSLZeroReturnError:  # close_notify after ours: Python raises instead of b""
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


Script = Callable[[End], bytes]


class ThreadServer:
    """Accepts connections in a thread, TLS with ``ctx``, and runs ``script`` on each; keeps what each
    script returned (or the error that ended it)."""

    def __init__(self, script: Script, ctx: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.script, self.ctx = script, ctx
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.2)
        self.address = Address(host, self.listener.getsockname()[1])
        self.results: list[bytes | BaseException] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(TIMEOUT)
            end = End(sock)
            try:
                if self.ctx is not None:
                    end = End(sock, self.ctx.wrap_socket(sock, server_side=True))
                self.results.append(self.script(end))
            except (OSError, ssl.SSLError) as exc:
                self.results.append(exc)
            finally:
                end.close()
                sock.close()

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(TIMEOUT)
        self.listener.close()


def own_member(script: Script, ctx: ssl.SSLContext | None = None) -> ThreadServer:
    """A member on a loopback address of its own (127.a.b.c, never 127.0.0.x), so that only the proxy
    under test reaches it. On 127.0.0.1 its port may be one another test on the host freed and still
    dials (a tcp probe of a "refused" member): a stranger's connection is then one of its results, and
    since it serves one connection at a time, one that says nothing holds up ours until they time out.
    Certificates name 127.0.0.1 and localhost: pools reaching one send ``localhost`` as SNI."""
    host = f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"
    return ThreadServer(script, ctx, host=host)


def ask(end: End, message: bytes) -> bytes:
    """Send ``message``, half-close, and return everything until the other side's end."""
    end.send(message)
    end.half_close()
    return end.read_to_eof()


def client_end(port: int, ctx: ssl.SSLContext | None) -> End:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return End(sock, None if ctx is None else ctx.wrap_socket(sock, server_hostname="localhost"))


# --- half-close: scripts for each end, by who half-closes first -------------------------------------


def upstream_replies_after_eof(end: End) -> bytes:
    got = end.read_to_eof()
    end.send(REPLY)
    end.half_close()
    return got


def client_asks_then_half_closes(end: End) -> bytes:
    end.send(REQUEST)
    end.half_close()
    reply = end.read_to_eof()
    end.close()
    return reply


def upstream_greets_then_half_closes(end: End) -> bytes:
    end.send(REPLY)
    end.half_close()
    return end.read_to_eof()


def client_answers_after_eof(end: End) -> bytes:
    greeting = end.read_to_eof()
    end.send(REQUEST)
    end.half_close()
    with contextlib.suppress(OSError):  # the proxy closes once both directions are done
        end.read_to_eof()
    end.close()
    return greeting


FIRST = {
    "client": (client_asks_then_half_closes, upstream_replies_after_eof),
    "upstream": (client_answers_after_eof, upstream_greets_then_half_closes),
}
SIDES = [("plain", "tls"), ("tls", "plain"), ("tls", "tls"), ("plain", "plain")]
CASES = [
    (client, upstream, first, version)
    for client, upstream in SIDES
    for first in FIRST
    for version in (VERSIONS if "tls" in (client, upstream) else ["1.3"])
]


def limited(ctx: ssl.SSLContext, version: str) -> ssl.SSLContext:
    ctx.maximum_version = VERSIONS[version]
    return ctx


@pytest.mark.parametrize(
    ("client", "upstream", "first", "version"), CASES, ids=["-".join(case[:3]) + f"-{case[3]}" for case in CASES]
)
async def test_half_close_passes_through_every_combination_of_sides(
    pki: PKI, client: str, upstream: str, first: str, version: str
) -> None:
    """The side that half-closes first still gets everything the other sends after it; both ends see
    every byte, the session ends as ``eof`` with exact counts."""
    client_script, upstream_script = FIRST[first]
    server_ctx = limited(pki.upstream_server_ctx(), version) if upstream == "tls" else None
    client_ctx = limited(pki.client_ctx(), version) if client == "tls" else None
    settings: dict[str, Any] = {}
    if client == "tls":
        settings["tls"] = pki.server_tls()
    if upstream == "tls":
        settings["upstream_tls"] = UpstreamTLSConfig(ca=pki["ca.pem"])
    with ThreadServer(upstream_script, server_ctx) as server:
        async with running(make_config([server.address], **settings)) as (proxy, log):
            end = await asyncio.to_thread(client_end, proxy.port(), client_ctx)
            got = await asyncio.to_thread(client_script, end)
            await log.wait_for(1, timeout=TIMEOUT)
    assert got == REPLY
    assert server.results == [REQUEST]
    [session] = log.sessions
    assert (session.end_cause, session.bytes_in, session.bytes_out) == ("eof", len(REQUEST), len(REPLY))
    if client == "tls":
        assert session.tls_info["tls_version"] == f"TLSv{version}"


# --- the late alert --------------------------------------------------------------------------------


def echo_to_eof(end: End) -> bytes:
    got = end.read_to_eof()
    end.send(got)
    end.half_close()
    return got


def refuse_without_certificate(end: End) -> bytes:  # never reached: the handshake fails first
    return b""


def requiring(pki: PKI) -> ssl.SSLContext:
    """A TLS 1.3 member that requires a client certificate (the proxy presents none)."""
    ctx = pki.upstream_server_ctx(client_ca="ca.pem")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def served_until_rejected(pki: PKI, bad: Address, good: ThreadServer, rejections: int) -> tuple[Any, Any]:
    """Clients, one at a time, through a pool of ``bad`` (first) and ``good`` until ``bad`` has failed
    ``rejections`` attempts (the balancer spreads, so it is tried soon): every client must be answered.
    Returns the bad member and the access log."""
    config = make_config([bad, good.address], upstream_tls=UpstreamTLSConfig(ca=pki["ca.pem"]), retries=2)
    async with running(config) as (proxy, log):
        bad_member = next(m for m in proxy.pools["default"].members if m.address == bad)
        for i in range(20):
            end = await asyncio.to_thread(client_end, proxy.port(), None)
            message = b"hello %d" % i
            assert await asyncio.to_thread(ask, end, message) == message
            end.close()
            if bad_member.stats.connect_failures["tls"] >= rejections:
                break
        await log.wait_for(len(good.results), timeout=TIMEOUT)
    return bad_member, log


async def test_a_member_that_rejects_us_after_the_tls13_handshake_is_a_failed_attempt(pki: PKI) -> None:
    """Each attempt at the rejecting member is a ``tls`` connect failure, and every client is served by
    the good member, none of them a session of the rejecting one."""
    with (
        ThreadServer(refuse_without_certificate, requiring(pki)) as bad,
        ThreadServer(echo_to_eof, pki.upstream_server_ctx()) as good,
    ):
        bad_member, log = await served_until_rejected(pki, bad.address, good, 2)
    assert bad_member.stats.connect_failures["tls"] >= 2
    assert bad_member.stats.sessions == 0
    assert [s.member.address for s in log.sessions] == [good.address] * len(log.sessions)
    assert all(s.end_cause == "eof" for s in log.sessions)
    assert all(isinstance(r, ssl.SSLError) for r in bad.results)


LATE = "after the handshake, before any data: the member may have rejected our certificate"


def hang_up(reset: bool) -> Script:
    """A member that ends each connection right after its handshake, without an alert, as one that
    refuses a certificate silently does: a FIN, or (``reset``) an RST."""

    def script(end: End) -> bytes:
        if reset:
            end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return b""

    return script


def silent(pki: PKI, client_ca: bool) -> ssl.SSLContext:
    """A TLS 1.3 member that sends nothing after its handshake (no session tickets); it asks for a
    client certificate with ``client_ca``."""
    ctx = pki.upstream_server_ctx(client_ca="ca.pem") if client_ca else pki.upstream_server_ctx()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    return ctx


def long_verdict_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wait 5 s for a member's first record after the handshake: its hang-up must come inside the
    wait, which on a loaded host a member thread may miss at the usual bound (the dial then succeeds)."""
    monkeypatch.setattr(tlsengine, "confirm_wait", lambda elapsed: 5.0)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_member_that_hangs_up_on_our_certificate_after_the_tls13_handshake_is_a_tls_failure(
    pki: PKI, monkeypatch: pytest.MonkeyPatch, reset: bool
) -> None:
    """No alert, so no reason from OpenSSL; but after a certificate we sent, a hang-up before any record
    is most likely its rejection: a ``tls`` connect failure saying so, not a reset."""
    long_verdict_wait(monkeypatch)
    tls = UpstreamTLSConfig(ca=pki["ca.pem"], sni="localhost", cert=pki["client.pem"], key=pki["client.key"])
    with own_member(hang_up(reset), silent(pki, client_ca=True)) as bad:
        async with running(make_config([bad.address], upstream_tls=tls, retries=0)) as (proxy, log):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
            with contextlib.suppress(OSError):
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
            await log.wait_for(1, timeout=TIMEOUT)
            [member] = proxy.pools["default"].members
    how = "reset" if reset else "closed"
    assert [s.end_cause for s in log.sessions] == [f"no_upstream (tls: {how} {LATE})"]
    assert (member.stats.connect_failures["tls"], member.stats.connect_failures["reset"]) == (1, 0)
    assert bad.results == [b""]  # its handshake passed: the hang-up came after it


@contextlib.contextmanager
def openssl_verify_server(pki: PKI) -> Iterator[Address]:
    """``openssl s_server -Verify 1``: TLS 1.3 only, a client certificate required."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", pki["server.pem"], "-key", pki["server.key"],
         "-CAfile", pki["ca.pem"], "-Verify", "1", "-tls1_3", "-rev"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while b"ACCEPT" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None, "openssl s_server did not start"
        yield Address("127.0.0.1", port)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_openssl_s_server_verify_rejects_us_and_the_next_member_serves(pki: PKI) -> None:
    with openssl_verify_server(pki) as bad, ThreadServer(echo_to_eof, pki.upstream_server_ctx()) as good:
        bad_member, log = await served_until_rejected(pki, bad, good, 1)
    assert bad_member.stats.connect_failures["tls"] >= 1
    assert bad_member.stats.sessions == 0
    assert {s.member.address for s in log.sessions} == {good.address}


def greet_without_tickets(end: End) -> bytes:
    end.send(b"220 ready\r\n")
    return echo_to_eof(end)


@pytest.mark.parametrize("speaks_first", [True, False], ids=["server_speaks_first", "client_speaks_first"])
async def test_tls13_members_that_send_no_session_tickets_still_serve(pki: PKI, speaks_first: bool) -> None:
    """Without tickets the first record after the handshake is a greeting (handed to the client) or
    nothing (the wait for it ends at its bound, then the session starts as usual)."""
    ctx = pki.upstream_server_ctx()
    ctx.num_tickets = 0
    script = greet_without_tickets if speaks_first else echo_to_eof
    with ThreadServer(script, ctx) as server:
        async with running(make_config([server.address], upstream_tls=UpstreamTLSConfig(ca=pki["ca.pem"]))) as (
            proxy,
            log,
        ):
            end = await asyncio.to_thread(client_end, proxy.port(), None)
            got = await asyncio.to_thread(ask, end, b"hi")
            end.close()
            await log.wait_for(1, timeout=TIMEOUT)
    assert got == (b"220 ready\r\nhi" if speaks_first else b"hi")
    assert log.sessions[0].end_cause == "eof"


@pytest.mark.parametrize(
    ("elapsed", "wait"), [(0.0, 0.02), (0.001, 0.02), (0.05, 0.1), (0.3, 0.6), (0.5, 1.0), (3.0, 1.0)]
)
def test_the_wait_for_a_late_verdict_is_twice_the_handshake_within_bounds(elapsed: float, wait: float) -> None:
    assert confirm_wait(elapsed) == pytest.approx(wait)


# --- backpressure through a TLS side ----------------------------------------------------------------

BLOB = os.urandom(8 * 1024 * 1024)


def send_blob_then_half_close(end: End) -> bytes:
    end.send(BLOB)
    end.half_close()
    return end.read_to_eof()


def read_blob_then_answer(end: End) -> bytes:
    """Read to the end first: Python's ``unwrap`` also tries to read the peer's close_notify, and data
    already waiting then is an error, so neither end here half-closes with the other's data in flight."""
    blob = end.read_to_eof()
    ask(end, b"thanks")
    end.close()
    return blob


@pytest.mark.parametrize("tls_side", ["upstream", "client"])
async def test_a_slow_reader_pauses_the_tls_sender_and_gets_every_byte(pki: PKI, tls_side: str) -> None:
    """Case 8 with a TLS side: while the client reads nothing, the proxy stops reading the upstream
    with at most a buffer and a read held for the client; then every byte arrives, and the half-close
    after it."""
    server_ctx = pki.upstream_server_ctx() if tls_side == "upstream" else None
    client_ctx = pki.client_ctx() if tls_side == "client" else None
    settings: dict[str, Any] = (
        {"upstream_tls": UpstreamTLSConfig(ca=pki["ca.pem"])} if tls_side == "upstream" else {"tls": pki.server_tls()}
    )
    with ThreadServer(send_blob_then_half_close, server_ctx) as server:
        async with running(make_config([server.address], **settings)) as (proxy, log):
            end = await asyncio.to_thread(client_end, proxy.port(), client_ctx)
            await eventually(lambda: any(s.upstream is not None for s in proxy.sessions))
            [session] = proxy.sessions
            upstream, client = session.upstream.transport, session.client.transport  # type: ignore[union-attr]
            assert upstream is not None and client is not None
            await eventually(lambda: not upstream.is_reading(), timeout=TIMEOUT)
            held = client.get_write_buffer_size()
            assert held <= session.buffer_size + 300_000
            got = await asyncio.to_thread(read_blob_then_answer, end)
            await log.wait_for(1, timeout=TIMEOUT)
    assert got == BLOB
    assert server.results == [b"thanks"]
    assert (log.sessions[0].end_cause, log.sessions[0].bytes_out) == ("eof", len(BLOB))


async def test_key_updates_from_an_openssl_client_are_answered_and_data_flows_on(pki: PKI) -> None:
    """TLS 1.3 KeyUpdate (``openssl s_client``'s ``K`` command asks us to update our keys too, ``k``
    does not): OpenSSL answers inside the engine's reads, and the echo goes on under the new keys."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is not installed"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running(make_config([Address("127.0.0.1", port)], tls=pki.server_tls())) as (proxy, log):
            proc = await asyncio.create_subprocess_exec(
                openssl, "s_client", "-connect", f"127.0.0.1:{proxy.port()}", "-tls1_3", "-CAfile", pki["ca.pem"],
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            seen: list[bytes] = []

            async def until(line: bytes) -> None:
                while (got := await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)) != line:  # type: ignore[union-attr]
                    assert got, f"s_client ended before {line!r}: {b''.join(seen)!r}"
                    seen.append(got)

            try:
                for command, message in ((b"", b"before\n"), (b"K\n", b"after K\n"), (b"k\n", b"after k\n")):
                    if command:  # s_client reads a command as a whole read: the message goes after it
                        proc.stdin.write(command)
                        await until(b"KEYUPDATE\n")
                    proc.stdin.write(message)
                    await until(message)
            finally:
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), TIMEOUT)
            await log.wait_for(1, timeout=TIMEOUT)
    finally:
        server.close()
        await server.wait_closed()
    assert log.sessions[0].tls_info["tls_version"] == "TLSv1.3"
    assert log.sessions[0].bytes_in == len(b"before\nafter K\nafter k\n")
