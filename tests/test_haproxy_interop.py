"""PROXY protocol against a real HAProxy, both ways.

* Our ``send_proxy`` v1 and v2 to an HAProxy frontend with ``accept-proxy``: HAProxy's own log
  (``%ci:%cp``) shows each real client, several 127.0.0.x sources; over our TLS termination its log
  reads the AUTHORITY TLV back (``%[fc_pp_authority]``: the SNI the client sent us).
* HAProxy's ``send-proxy`` and ``send-proxy-v2`` to our ``accept_proxy``: the real client addresses
  reach our access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from l4proxy import Address
from l4proxy.config import ServerTLSConfig

from .kit import eventually, running, upstreams
from .servers import free_port, require
from .test_edge import edge_config, exchange

_GLOBAL = """global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
"""


@contextlib.contextmanager
def haproxy(tmp_path: Path, body: str) -> Iterator[Path]:
    """HAProxy in the foreground with ``body`` after the defaults; yields the file its log goes to."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(_GLOBAL + body)
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([require("haproxy"), "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        proc.terminate()
        proc.wait(10)


async def listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts on 127.0.0.1:``port``."""

    def up() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    await eventually(up, timeout)


def accepting(front: int, log_format: str, member: int) -> str:
    """An HAProxy frontend on ``front`` that requires a PROXY header and logs ``log_format``."""
    return f"""frontend fe
    bind 127.0.0.1:{front} accept-proxy
    log-format "{log_format}"
    default_backend be
backend be
    server s1 127.0.0.1:{member}
"""


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_haproxy_accepting_our_header_logs_each_real_client(tmp_path: Path, version: str) -> None:
    front = free_port()
    async with upstreams(1) as [echo]:
        with haproxy(tmp_path, accepting(front, "client %ci:%cp", echo.port)) as log:
            await listening(front)
            config = edge_config([Address("127.0.0.1", front)], send_proxy=version)
            async with running(config) as (proxy, _):
                clients = []
                for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                    reply, port = await exchange(proxy.port(), b"through haproxy", source=source)
                    assert reply == b"through haproxy"
                    clients.append(f"client {source}:{port}")
                await eventually(lambda: all(c in log.read_text() for c in clients))
    lines = [line for line in log.read_text().splitlines() if line.startswith("client ")]
    assert sorted(lines) == sorted(clients)  # the listening probe sent no header: refused, not logged


@pytest.fixture(scope="module")
def server_pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, trustme.CA]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("interop") / "server.pem"
    ca.issue_cert("cache.example", common_name="cache.example").private_key_and_cert_chain_pem.write_to_path(path)
    return str(path), ca


async def test_haproxy_reads_the_authority_tlv_of_our_v2_header_over_tls(
    tmp_path: Path, server_pem: tuple[str, trustme.CA]
) -> None:
    pem, ca = server_pem
    front = free_port()
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with upstreams(1) as [echo]:
        with haproxy(tmp_path, accepting(front, "client %ci:%cp authority %[fc_pp_authority]", echo.port)) as log:
            await listening(front)
            config = edge_config([Address("127.0.0.1", front)], send_proxy="v2", tls=ServerTLSConfig(pem, pem))
            async with running(config) as (proxy, _):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", proxy.port(), ssl=client_ctx, server_hostname="cache.example",
                    local_addr=("127.0.0.6", 0),
                )  # fmt: skip
                port = writer.get_extra_info("sockname")[1]
                writer.write(b"tls in front")
                assert await asyncio.wait_for(reader.readexactly(12), 5) == b"tls in front"
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
                expected = f"client 127.0.0.6:{port} authority cache.example"
                await eventually(lambda: expected in log.read_text())


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
async def test_our_access_log_shows_the_clients_behind_haproxy(tmp_path: Path, option: str) -> None:
    front = free_port()
    async with upstreams(1) as [echo], running(edge_config([echo.address], accept_proxy=True)) as (proxy, access):
        body = f"""frontend fe
    bind 127.0.0.1:{front}
    default_backend be
backend be
    server ours 127.0.0.1:{proxy.port()} {option}
"""
        with haproxy(tmp_path, body):
            await listening(front)  # HAProxy may pass this probe on, from 127.0.0.1
            clients = []
            for source in ("127.0.0.7", "127.0.0.8"):
                reply, port = await exchange(front, b"behind haproxy", source=source)
                assert reply == b"behind haproxy"
                clients.append(f"client={source}:{port}")

            def behind() -> list[str]:
                return sorted(line.split()[1] for line in access.lines if "client=127.0.0.1:" not in line)

            await eventually(lambda: behind() == sorted(clients))
    assert proxy.frontends[0].header_errors == {}
