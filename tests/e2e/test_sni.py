"""SNI routing without termination, end to end on loopback: real TLS servers (each with its own
certificate) behind one listener, reached by Python's ssl and by ``openssl s_client -servername``;
the certificate each client saw proves which server it reached, and so that the proxy did not touch the
TLS. A client without SNI goes to the default pool, an unrouted name is refused with ``sni_strict``, a
client that never finishes its ClientHello is closed at ``sni_timeout``, and a reload changes the
routes in place. Both loops (conftest), both relay engines."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from l4proxy import Address, Config, HealthConfig
from l4proxy.config import ListenerConfig, PoolConfig
from l4proxy.proxy import Proxy
from l4proxy.splice import Splicer

from ..kit import ENGINES, eventually, running
from ..kit import sni_client_hello as client_hello
from ..servers import Command, free_port, run_command, wait_listening, wait_until

NAMES = {"pa": "a.example", "pb": "x.b.example", "pc": "default.example"}  # pool: the name its server holds


@dataclass
class TLSServer:
    """A TLS server on loopback presenting a certificate for ``name``: says its name, then echoes."""

    name: str
    server: asyncio.Server
    accepted: int = 0

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.server.sockets[0].getsockname()[1])


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def tls_servers(ca: trustme.CA) -> AsyncIterator[dict[str, TLSServer]]:
    servers: dict[str, TLSServer] = {}

    def serving(name: str) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            servers_by_name[name].accepted += 1
            writer.write(f"I am {name}\n".encode())
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        return handle

    servers_by_name: dict[str, TLSServer] = {}
    for pool, name in NAMES.items():
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name, common_name=name).configure_cert(context)
        server = await asyncio.start_server(serving(name), "127.0.0.1", 0, ssl=context)
        servers[pool] = servers_by_name[name] = TLSServer(name, server)
    try:
        yield servers
    finally:
        for tls in servers.values():
            tls.server.close()
            await tls.server.wait_closed()


def sni_config(servers: dict[str, TLSServer], relay: str, **listener: Any) -> Config:
    """One listener routing a.example to pa, *.b.example to pb, the rest to pc (``pool``)."""
    settings: dict[str, Any] = {"sni": {"a.example": "pa", "*.b.example": "pb"}, "pool": "pc", **listener}
    pools = tuple(
        PoolConfig(members=(tls.address,), name=pool, health=HealthConfig(enabled=False))
        for pool, tls in servers.items()
    )
    listen = ListenerConfig(Address("127.0.0.1", 0), relay=relay, **settings)
    return Config(listeners=(listen,), pools=pools, drain_timeout=2.0, access_log="off")


def client_context(ca: trustme.CA, verify_name: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = verify_name
    return context


def peer_names(writer: asyncio.StreamWriter) -> tuple[str, list[str]]:
    """The CN and the DNS SANs of the certificate the client was shown."""
    cert = writer.get_extra_info("peercert")
    cn = next(value for rdn in cert["subject"] for key, value in rdn if key == "commonName")
    return cn, [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


async def tls_session(
    port: int, ca: trustme.CA, name: str | None, payload: bytes = b"ping", check: bool = True
) -> tuple[str, str, bytes]:
    """A TLS client asking for ``name`` (None: no SNI), checking the certificate is for it unless not
    ``check``: the CN it saw, the greeting, and the echo."""
    context = client_context(ca, check and name is not None)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name or ""), 10
    )
    try:
        cn, sans = peer_names(writer)
        assert cn in sans
        greeting = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        writer.write(payload)
        echo = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        return cn, greeting, echo
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.mark.parametrize("relay", ENGINES)
async def test_two_names_reach_two_servers_each_with_its_own_certificate(ca: trustme.CA, relay: str) -> None:
    async with tls_servers(ca) as servers, running(sni_config(servers, relay)) as (proxy, _log):
        port = proxy.port()
        payload = bytes(range(256)) * 1024  # enough to move a session to the splice engine under auto
        for name, expected in (("a.example", "a.example"), ("x.b.example", "x.b.example"),
                               ("X.B.Example", "x.b.example")):  # fmt: skip
            cn, greeting, echo = await tls_session(port, ca, name, payload)
            assert (cn, greeting, echo == payload) == (expected, f"I am {expected}", True)
        cn, greeting, _ = await tls_session(port, ca, None)  # no SNI: the default pool
        assert (cn, greeting) == ("default.example", "I am default.example")
        cn, greeting, _ = await tls_session(port, ca, "other.example", check=False)  # no route matches
        assert cn == "default.example"
        sni = proxy.frontends[0].sni
        assert sni is not None
        assert sni.routed == {"pa": 1, "pb": 2, "pc": 2}
        assert (sni.errors, sni.refused) == ({}, {})
        assert [servers[p].accepted for p in ("pa", "pb", "pc")] == [1, 2, 2]


async def test_a_session_on_the_splice_engine_carries_the_peeked_hello(ca: trustme.CA) -> None:
    """With ``relay = "splice"`` every session is spliced from its first byte: the ClientHello, never read
    by the proxy, goes through the kernel pipes like the rest."""
    async with tls_servers(ca) as servers, running(sni_config(servers, "splice")) as (proxy, _log):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port(), ssl=client_context(ca), server_hostname="a.example"
        )
        assert (await reader.readline()) == b"I am a.example\n"
        [session] = proxy.sessions
        assert isinstance(session.engine, Splicer)
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def test_openssl_s_client_with_servername(ca: trustme.CA, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with tls_servers(ca) as servers, running(sni_config(servers, "auto")) as (proxy, _log):
        for name, expected in (("a.example", "a.example"), ("y.b.example", "x.b.example")):
            client = await asyncio.create_subprocess_exec(
                openssl, "s_client", "-connect", f"127.0.0.1:{proxy.port()}", "-servername", name,
                "-CAfile", str(ca_file), "-verify_return_error", "-brief",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert client.stdout is not None and client.stdin is not None and client.stderr is not None
            greeting = await asyncio.wait_for(client.stdout.readline(), 10)
            client.stdin.close()
            _, err = await asyncio.wait_for(client.communicate(), 10)
            assert greeting == f"I am {expected}\n".encode()
            assert f"CN = {expected}" in err.decode()  # -brief: "Peer certificate: CN = ..."
            assert "Verification: OK" in err.decode()


@pytest.mark.parametrize("relay", ENGINES)
async def test_strict_routes_refuse_an_unrouted_name_and_a_client_without_sni(ca: trustme.CA, relay: str) -> None:
    async with tls_servers(ca) as servers, running(sni_config(servers, relay, sni_strict=True)) as (proxy, _log):
        for name in ("nobody.example", None):
            with pytest.raises((OSError, ssl.SSLError)):
                await tls_session(proxy.port(), ca, name)
        cn, _, _ = await tls_session(proxy.port(), ca, "a.example")
        assert cn == "a.example"
        sni = proxy.frontends[0].sni
        assert sni is not None
        assert sni.refused == {"no_route": 1, "no_sni": 1}
        assert [servers[p].accepted for p in ("pa", "pb", "pc")] == [1, 0, 0]  # nothing dialed for the refused


async def raw_client(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` and wait for the proxy to close: what came back, and how long that took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(data)
    try:
        got = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        got = b""
    took = time.monotonic() - started
    writer.close()
    return got, took


@pytest.mark.parametrize("relay", ENGINES)
async def test_a_client_that_never_completes_its_hello_is_closed_at_the_timeout(
    ca: trustme.CA, relay: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_servers(ca) as servers, running(sni_config(servers, relay, sni_timeout=0.3)) as (proxy, _log):
        sni = proxy.frontends[0].sni
        assert sni is not None
        partial = client_hello("a.example")[:40]
        got, took = await raw_client(proxy.port(), partial)
        assert got == b"" and 0.25 <= took < 5
        silent, took = await raw_client(proxy.port(), b"")
        assert silent == b"" and 0.25 <= took < 5
        assert sni.errors == {"timeout": 2}
        assert sni.peeking == set()
        late = f" on {proxy.config.listeners[0].address}: no whole TLS ClientHello within 0.3s"
        assert any(late in record.getMessage() for record in caplog.records), caplog.text
        assert sum(s.accepted for s in servers.values()) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "not_tls"), (b"\x16\x03\x01\x00\x00", "bad_record")],
)
async def test_a_client_that_is_not_tls_is_closed_at_once(ca: trustme.CA, data: bytes, reason: str) -> None:
    async with tls_servers(ca) as servers, running(sni_config(servers, "auto", sni_timeout=30.0)) as (proxy, _log):
        got, took = await raw_client(proxy.port(), data)
        assert got == b"" and took < 5
        sni = proxy.frontends[0].sni
        assert sni is not None
        assert sni.errors == {reason: 1}


async def test_a_client_that_leaves_mid_hello_is_counted(ca: trustme.CA) -> None:
    async with tls_servers(ca) as servers, running(sni_config(servers, "auto")) as (proxy, _log):
        sni = proxy.frontends[0].sni
        assert sni is not None
        with socket.create_connection(("127.0.0.1", proxy.port())) as client:
            client.sendall(client_hello("a.example")[:20])
            await eventually(lambda: len(sni.peeking) == 1)
        await eventually(lambda: sni.errors == {"eof": 1})
        assert sni.peeking == set()


async def test_a_hello_in_many_small_chunks_is_routed(ca: trustme.CA) -> None:
    """Each piece wakes the stage once (SO_RCVLOWAT): it neither spins nor misses the end."""
    async with tls_servers(ca) as servers, running(sni_config(servers, "auto")) as (proxy, _log):
        sni = proxy.frontends[0].sni
        assert sni is not None
        flight = client_hello("a.example")
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port())
        for at in range(0, len(flight), 50):
            writer.write(flight[at : at + 50])
            await writer.drain()
            if at + 50 < len(flight):
                await eventually(lambda: len(sni.peeking) == 1)
        await eventually(lambda: sni.routed == {"pa": 1})
        writer.close()


async def test_a_reload_changes_the_routes_in_place(ca: trustme.CA) -> None:
    async with tls_servers(ca) as servers:
        config = sni_config(servers, "auto")
        async with running(config) as (proxy, _log):
            frontend = proxy.frontends[0]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.port(), ssl=client_context(ca), server_hostname="a.example"
            )
            assert await reader.readline() == b"I am a.example\n"
            rerouted = replace(config.listeners[0], sni=(("a.example", "pc"), ("*.b.example", "pb")))
            steps, problems = await proxy.reconfigure(replace(config, listeners=(rerouted,)))
            assert problems == [] and [k.rebuilt for k in steps.kept] == [False]
            assert proxy.frontends[0] is frontend
            writer.write(b"still here")  # the session routed before the reload goes on
            assert await reader.readexactly(10) == b"still here"
            cn, _, _ = await tls_session(proxy.port(), ca, None)
            assert cn == "default.example"
            with pytest.raises(ssl.SSLCertVerificationError):  # a.example now reaches pc's certificate
                await tls_session(proxy.port(), ca, "a.example")
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def test_listeners_without_routes_have_no_sni_stage() -> None:
    config = Config(
        listeners=(ListenerConfig(Address("127.0.0.1", 0)),),
        pools=(PoolConfig(members=(Address("127.0.0.1", 1),)),),
    )
    proxy = Proxy(config)
    assert proxy.frontends[0].sni is None


# --- the real command: a config file, workers, a reload ----------------------------------------------


def threaded_tls_server(ca: trustme.CA, name: str) -> socket.socket:
    """A TLS server in threads presenting a certificate for ``name``, saying its name to each client."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name, common_name=name).configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(f"I am {name}\n".encode())
            while tls.recv(65536):
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def greeting(port: int, ca: trustme.CA, name: str) -> tuple[str, str]:
    """What a Python ssl client asking for ``name`` is told, and the CN of the certificate it saw."""
    context = client_context(ca, verify_name=False)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname=name) as tls:
        cert = tls.getpeercert()
        assert cert is not None
        cn = next(value for rdn in cert["subject"] for key, value in rdn if key == "commonName")
        return tls.recv(100).decode().strip(), cn


@pytest.mark.parametrize("workers", [1, 2])
def test_the_command_routes_by_sni_from_its_file_and_reloads_routes(
    ca: trustme.CA, tmp_path: Path, workers: int
) -> None:
    servers = {pool: threaded_tls_server(ca, name) for pool, name in NAMES.items()}
    port = free_port()
    path = tmp_path / "sni.toml"

    def write(routes: str) -> None:
        pools = "".join(f'[pools.{pool}]\nmembers = ["127.0.0.1:{s.getsockname()[1]}"]\nhealth.enabled = false\n'
                        for pool, s in servers.items())  # fmt: skip
        path.write_text(f'access_log = "off"\nworkers = {workers}\n[listeners.edge]\naddress = "127.0.0.1:{port}"\n'
                        f'pool = "pc"\nsni = {{ {routes} }}\n{pools}')  # fmt: skip

    write('"a.example" = "pa", "*.b.example" = "pb"')
    check = run_command("check", "--config", str(path))
    assert check.returncode == 0, check.stderr
    assert 'sni = {"a.example" = "pa", "*.b.example" = "pb"}' in check.stdout
    command = Command("--config", str(path), listen=False, listeners=workers)
    try:
        command.start()
        wait_listening(port)
        assert greeting(port, ca, "a.example") == ("I am a.example", "a.example")
        assert greeting(port, ca, "y.b.example") == ("I am x.b.example", "x.b.example")
        assert greeting(port, ca, "c.example") == ("I am default.example", "default.example")
        write('"a.example" = "pb", "c.example" = "pa"')
        command.signal(signal.SIGHUP)
        command.wait_log("SIGHUP: configuration reloaded")
        wait_until(lambda: greeting(port, ca, "c.example")[1] == "a.example")  # every worker has it
        for _ in range(4 * workers):  # whichever worker takes the client
            assert greeting(port, ca, "c.example") == ("I am a.example", "a.example")
            assert greeting(port, ca, "a.example") == ("I am x.b.example", "x.b.example")
            assert greeting(port, ca, "y.b.example") == ("I am default.example", "default.example")
        assert command.stop() == 0
    finally:
        command.kill()
        for listener in servers.values():
            listener.close()
