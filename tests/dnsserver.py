"""A real DNS server for discovery tests: dnsmasq on a free loopback port, serving a hosts file and SRV
records of its own (nothing from the machine: no /etc/hosts, no upstream servers, only ``.test`` names).

``set_hosts`` rewrites the hosts file and sends SIGHUP (dnsmasq re-reads hosts files on it), then waits
until the server answers with the new records. SRV records live in dnsmasq's configuration, which
SIGHUP does not re-read: ``set_srv`` restarts the server on the same port. ``getaddrinfo`` is the
system resolver's shape (``loop.getaddrinfo``) answered by this server, for ``Resolver(getaddrinfo=)``;
``resolver()`` is a dnspython resolver pointed at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from l4proxy import Address, HealthConfig
from l4proxy.config import Config, Service

from .kit import Upstream, make_config
from .servers import free_port


def dnsmasq_path() -> str:
    """dnsmasq lives in /usr/sbin, which is not on every user's PATH; missing, it fails the test (CI
    installs it), never skips."""
    path = shutil.which("dnsmasq", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert path, "dnsmasq is not installed: run the test command from README.md (it installs it)"
    return path

SRV = tuple[str, str, int, int, int]  # name, target, port, priority, weight


class Dnsmasq:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.hosts = tmp / "hosts"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.srv: list[SRV] = []
        self.records: dict[str, list[str]] = {}
        self.lifetime = 1.0  # how long one query waits for this server

    def start(self) -> Dnsmasq:
        self._write_hosts()
        args = [
            dnsmasq_path(),
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts}",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local=/test/",  # names under .test come from here only: unknown ones are NXDOMAIN
            "--cache-size=0",
            "--pid-file=",
            f"--log-facility={self.dir / 'dnsmasq.log'}",
            *(f"--srv-host={','.join(map(str, record))}" for record in self.srv),
        ]
        if os.geteuid() == 0:
            args.append("--user=root")  # keep reading the test's hosts file after SIGHUP
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_answering()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    def set_hosts(self, records: Mapping[str, Sequence[str]]) -> None:
        """Serve exactly ``records`` (name -> IPs) from now on."""
        self.records = {name: list(ips) for name, ips in records.items()}
        self._write_hosts()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while any(sorted(self._query(name)) != sorted(ips) for name, ips in self.records.items()):
            assert time.monotonic() < deadline, "dnsmasq did not reload its hosts file"
            time.sleep(0.02)

    def set_srv(self, records: Sequence[SRV]) -> None:
        """Serve exactly these SRV records: a restart on the same port (SIGHUP does not re-read them)."""
        self.srv = list(records)
        self.stop()
        self.start()

    def _write_hosts(self) -> None:
        lines = [f"{ip} {name}" for name, ips in self.records.items() for ip in ips]
        self.hosts.write_text("".join(line + "\n" for line in lines))

    def _sync(self) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, self.lifetime
        return resolver

    def _query(self, name: str) -> list[str]:
        found = []
        for kind in ("A", "AAAA"):
            with contextlib.suppress(dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                found += [r.to_text() for r in self._sync().resolve(name, kind)]
        return found

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            assert self.proc is not None and self.proc.poll() is None, self._failure()
            try:
                self._sync().resolve("nothing-here.test", "A")
            except dns.resolver.NXDOMAIN:
                return
            except dns.exception.DNSException:
                assert time.monotonic() < deadline, "dnsmasq does not answer"
                time.sleep(0.02)

    def _failure(self) -> str:
        stderr = self.proc.stderr.read().decode() if self.proc and self.proc.stderr else ""
        return f"dnsmasq exited: {stderr}"

    def resolver(self) -> dns.asyncresolver.Resolver:
        """A dnspython resolver asking only this server."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], self.port, self.lifetime
        return resolver

    async def getaddrinfo(self, host: str, port: int, **_hints: Any) -> list[tuple[Any, ...]]:
        """``loop.getaddrinfo`` answered by this server: its errors as the system resolver raises them."""
        resolver = self.resolver()
        infos: list[tuple[Any, ...]] = []
        for kind, family in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            try:
                reply = await resolver.resolve(host, kind)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution") from exc
            infos += [(family, socket.SOCK_STREAM, 6, "", (r.address, port)) for r in reply]
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos


# --- members that move: upstreams that tell probes from clients, a pool that resolves names ---------

PROBE = HealthConfig(interval=0.3, timeout=0.5, rise=2, fall=2, send=b"PING\r\n", expect=b"+PONG")


class Recording(Upstream):
    """An upstream that answers probes (``PING`` -> ``+PONG``) and echoes clients, recording which of
    the two each connection was, in order."""

    def __init__(self, host: str) -> None:
        super().__init__(self._serve_one, host)
        self.kinds: list[str] = []

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        if data.startswith(b"PING"):
            self.kinds.append("probe")
            writer.write(b"+PONG\r\n")
            return
        self.kinds.append("client")
        while data:
            writer.write(data)
            await writer.drain()
            data = await reader.read(65536)


@contextlib.asynccontextmanager
async def pair() -> AsyncIterator[tuple[Recording, Recording]]:
    """Two recording upstreams on the same port, at 127.0.0.2 and 127.0.0.3: where a name moves."""
    old = await Recording("127.0.0.2").start()
    new = await Recording("127.0.0.3").start(old.port)
    try:
        yield old, new
    finally:
        await old.stop()
        await new.stop()


def discovering(members: list[Address | Service], health: HealthConfig = PROBE, **pool: float) -> Config:
    config = make_config([Address("127.0.0.1", 1)], health=health)
    settings = {"resolve_interval": 0.1, **pool}
    pool = dataclasses.replace(config.pools[0], members=tuple(members), **settings)
    return dataclasses.replace(config, pools=(pool,))
