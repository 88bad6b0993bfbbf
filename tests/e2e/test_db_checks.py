"""The database and HTTP health checks against real servers: two redis-servers as primary and
replica, PostgreSQL 15 clusters (a primary, a streaming standby, trust, md5 and SCRAM users), and a
small HTTP server of the test's own. RELIABILITY.md cases 20 and 39 (detection)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy import Address, HealthConfig, PoolConfig
from l4proxy.checks import Failure, Verdict
from l4proxy.pool import Pool
from l4proxy.prober import Prober, probe

from ..kit import Upstream, eventually, make_config, refused_address, running
from ..servers import PostgresCluster, RedisServer, postgres_root

PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all trusty 127.0.0.1/32 trust
host all md5user 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
host replication postgres 127.0.0.1/32 trust
"""


def fast(check: str, **settings: object) -> HealthConfig:
    return HealthConfig(enabled=True, interval=0.05, timeout=1.0, rise=1, fall=1, check=check, **settings)  # type: ignore[arg-type]


async def probe_once(address: Address, health: HealthConfig) -> Verdict:
    """One probe of ``address`` with ``health``, as the prober runs it."""
    pool = Pool(PoolConfig(members=(address,), health=health))
    prober = Prober(pool)
    if health.auth is not None:
        from l4proxy.checks import load_credentials

        prober.credentials = load_credentials(health.auth, health.kind)
    [member] = pool.members
    return await probe(pool, member, prober.conversation(member))


def secret(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"auth-{abs(hash(text))}"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def changes(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "l4proxy.health" and text in r.getMessage()]


# --- Redis -----------------------------------------------------------------------------------------


@pytest.fixture
def redis_pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    a, b = RedisServer(dirs[0]), RedisServer(dirs[1])
    try:
        a.start()
        b.start()
        b.cli("REPLICAOF", "127.0.0.1", str(a.port))
        yield a, b
    finally:
        a.stop()
        b.stop()


async def test_redis_primary_passes_on_the_primary_only_and_follows_a_failover(
    redis_pair: tuple[RedisServer, RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    a, b = redis_pair
    members = [Address("127.0.0.1", a.port), Address("127.0.0.1", b.port)]
    async with running(make_config(members, health=fast("redis-primary"))) as (proxy, _):
        pool = proxy.pools["default"]
        [prober] = proxy.probers
        member_a, member_b = pool.members
        await eventually(lambda: member_a.health.up and not member_b.health.up)
        assert member_b.health.last_reason == "check failed: wrong role: slave"

        b.cli("REPLICAOF", "NO", "ONE")  # the replica is promoted while the old primary still claims it
        await eventually(lambda: member_a.health.up and member_b.health.up)
        await eventually(lambda: prober.split_brain is not None and prober.split_brain.active)
        a.cli("REPLICAOF", "127.0.0.1", str(b.port))  # ... and the old one is demoted
        await eventually(lambda: member_b.health.up and not member_a.health.up)
        await eventually(lambda: prober.split_brain is not None and not prober.split_brain.active)
        assert prober.failures[member_a.key, Failure.WRONG_ROLE] >= 1
        assert prober.failures[member_b.key, Failure.WRONG_ROLE] >= 1
    assert prober.split_brain is not None and prober.split_brain.episodes == 1
    a_name, b_name = member_a.name, member_b.name
    assert changes(caplog, "split brain") == [
        "pool default split brain: 2 members claim the primary role: " + ", ".join(sorted([a_name, b_name]))
        + "; no member gets new sessions until one alone claims it",
        f"pool default split brain over: {b_name} claims the primary role",
    ]


async def test_redis_auth(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, extra=["--requirepass", "s3 cret"]).start()
    try:
        address = Address("127.0.0.1", server.port)
        good = secret(tmp_path, "default s3 cret\n")
        assert (await probe_once(address, fast("redis", auth=good))).ok
        assert (await probe_once(address, fast("redis-primary", auth=good))).ok
        wrong = await probe_once(address, fast("redis", auth=secret(tmp_path, "nope\n")))
        assert wrong.failure is Failure.AUTH_FAILED and wrong.detail.startswith("WRONGPASS")
        none = await probe_once(address, fast("redis"))
        assert none == Verdict(Failure.AUTH_FAILED, "NOAUTH Authentication required.")
    finally:
        server.stop()


async def test_redis_check_failure_kinds(tmp_path: Path) -> None:
    assert await probe_once(refused_address(), fast("redis")) == Verdict(Failure.REFUSED)

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()

    async with Upstream(http) as not_redis:
        assert await probe_once(not_redis.address, fast("redis")) == Verdict(
            Failure.BAD_REPLY, "unknown reply type b'H'"
        )


# --- HTTP ------------------------------------------------------------------------------------------


class Patroni:
    """Answers ``GET /primary`` with 200 while ``primary``, else 503, as Patroni's REST API does."""

    def __init__(self) -> None:
        self.primary = True
        self.paths: list[str] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.paths.append(head.split(b" ")[1].decode())
        status = b"200 OK" if self.primary else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()


async def test_http_check_on_a_side_port_follows_the_status() -> None:
    api = Patroni()
    async with Upstream(api) as side, Upstream() as database:
        health = fast("http", path="/primary", port=side.port, status="200")
        async with running(make_config([database.address], health=health)) as (proxy, _):
            [member] = proxy.pools["default"].members
            await eventually(lambda: len(api.paths) >= 2)
            assert member.health.up
            api.primary = False
            await eventually(lambda: not member.health.up)
            assert member.health.last_reason == "check failed: bad reply: status 503 Service Unavailable, expected 200"
            api.primary = True
            await eventually(lambda: member.health.up)
        assert set(api.paths) == {"/primary"}
        assert database.accepted == 0  # the side port was probed, not the member's own


# --- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg() -> Iterator[tuple[PostgresCluster, PostgresCluster]]:
    """A primary with trust, md5 and SCRAM users, and a streaming standby of it."""
    with postgres_root() as root:
        primary = PostgresCluster(root, "primary").init(PG_HBA)
        standby = PostgresCluster(root, "standby")
        try:
            primary.start()
            primary.sql("CREATE ROLE trusty LOGIN; CREATE ROLE scramuser LOGIN PASSWORD 'scram pw'")
            primary.sql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'")
            standby.backup_of(primary, standby=True).start()
            yield primary, standby
        finally:
            standby.stop()
            primary.stop()


@pytest.mark.parametrize(
    ("credentials", "verdict"),
    [
        ("trusty postgres", Verdict()),
        ("md5user postgres md5-pw", Verdict()),
        ("scramuser postgres scram pw", Verdict()),
        ("scramuser postgres wrong", Verdict(Failure.AUTH_FAILED,
                                             'FATAL 28P01 password authentication failed for user "scramuser"')),
        ("md5user postgres wrong", Verdict(Failure.AUTH_FAILED,
                                           'FATAL 28P01 password authentication failed for user "md5user"')),
        ("scramuser postgres", Verdict(Failure.AUTH_FAILED,
                                       "the server asks for a password; the credentials file has none")),
        ("trusty nosuchdb", Verdict(Failure.AUTH_FAILED, 'FATAL 3D000 database "nosuchdb" does not exist')),
    ],
)  # fmt: skip
async def test_postgres_login(
    pg: tuple[PostgresCluster, PostgresCluster], tmp_path: Path, credentials: str, verdict: Verdict
) -> None:
    primary, _ = pg
    address = Address("127.0.0.1", primary.port)
    assert await probe_once(address, fast("postgres", auth=secret(tmp_path, credentials))) == verdict


async def test_postgres_primary_passes_on_the_primary_and_not_on_the_standby(
    pg: tuple[PostgresCluster, PostgresCluster], tmp_path: Path
) -> None:
    primary, standby = pg
    auth = secret(tmp_path, "scramuser postgres scram pw")
    assert await probe_once(Address("127.0.0.1", primary.port), fast("postgres-primary", auth=auth)) == Verdict()
    assert await probe_once(Address("127.0.0.1", standby.port), fast("postgres-primary", auth=auth)) == Verdict(
        Failure.WRONG_ROLE, "in hot standby (in_hot_standby=on)"
    )
    assert await probe_once(Address("127.0.0.1", standby.port), fast("postgres", auth=auth)) == Verdict()


async def test_postgres_primary_follows_a_promotion(
    pg: tuple[PostgresCluster, PostgresCluster], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pair of its own: promote the standby (two primaries: a split brain), then stop the old one."""
    caplog.set_level(logging.INFO, logger="l4proxy.health")
    source, _ = pg
    old = PostgresCluster(source.root, f"old-{tmp_path.name}").backup_of(source, standby=False).start()
    new = PostgresCluster(source.root, f"new-{tmp_path.name}")
    try:
        new.backup_of(old, standby=True).start()
        health = fast("postgres-primary", auth=secret(tmp_path, "trusty postgres"))
        members = [Address("127.0.0.1", old.port), Address("127.0.0.1", new.port)]
        async with running(make_config(members, health=health)) as (proxy, _):
            member_old, member_new = proxy.pools["default"].members
            [prober] = proxy.probers
            await eventually(lambda: member_old.health.up and not member_new.health.up)
            new.promote()
            await eventually(lambda: member_new.health.up, timeout=10)
            await eventually(lambda: prober.split_brain is not None and prober.split_brain.episodes == 1)
            old.stop()
            await eventually(lambda: not member_old.health.up, timeout=10)
            assert member_old.health.last_reason in ("check failed: refused", "check failed: bad reply: closed "
                                                     "before ReadyForQuery")  # fmt: skip
            await eventually(lambda: prober.split_brain is not None and not prober.split_brain.active)
    finally:
        new.stop()
        old.stop()
    assert len(changes(caplog, "split brain: 2 members claim the primary role")) == 1
