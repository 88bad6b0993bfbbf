"""``reload.plan`` as a table: a running Config and an edit of it, and what the plan does about it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from l4proxy.config import (
    Address,
    Config,
    HealthConfig,
    ListenerConfig,
    PoolConfig,
    ServerTLSConfig,
    UpstreamTLSConfig,
)
from l4proxy.reload import Kept, Plan, plan

A, B, C = Address("127.0.0.1", 7000), Address("127.0.0.1", 7001), Address("", 7002)
TLS = ServerTLSConfig(cert="c.pem", key="k.pem")


def base() -> Config:
    return Config(
        listeners=(ListenerConfig(A, pool="cache", name="cache"), ListenerConfig(B, pool="db", name="db")),
        pools=(
            PoolConfig((Address("10.0.0.1", 6379), Address("10.0.0.2", 6379)), name="cache"),
            PoolConfig((Address("10.0.0.3", 5432),), name="db"),
        ),
    )


def listener(config: Config, index: int, **changes: Any) -> Config:
    listeners = list(config.listeners)
    listeners[index] = dataclasses.replace(listeners[index], **changes)
    return dataclasses.replace(config, listeners=tuple(listeners))


def pool(config: Config, name: str, **changes: Any) -> Config:
    pools = tuple(dataclasses.replace(p, **changes) if p.name == name else p for p in config.pools)
    return dataclasses.replace(config, pools=pools)


def add_cold_pool(config: Config) -> Config:
    cold = PoolConfig((Address("10.0.0.9", 7000),), name="cold")
    return dataclasses.replace(config, pools=(*config.pools, cold))


Edit = Callable[[Config], Config]
KEEP_BOTH = (Kept(0, 0, False), Kept(1, 1, False))

# (what changes, the edit, the plan's fields that differ from an empty plan)
CASES: list[tuple[str, Edit, dict[str, Any]]] = [
    ("nothing", lambda c: c, {"kept": KEEP_BOTH}),
    ("a listener renamed", lambda c: listener(c, 0, name="redis"), {"kept": KEEP_BOTH}),
    ("a listener's idle timeout", lambda c: listener(c, 0, idle_timeout=60.0),
     {"kept": (Kept(0, 0, True), Kept(1, 1, False))}),
    ("a listener's backlog", lambda c: listener(c, 1, backlog=16), {"kept": (Kept(0, 0, False), Kept(1, 1, True))}),
    ("a listener moved to another pool", lambda c: listener(c, 1, pool="cache"),
     {"kept": (Kept(0, 0, False), Kept(1, 1, True))}),
    ("a listener at a new address", lambda c: listener(c, 1, address=C),
     {"kept": (Kept(0, 0, False),), "opened": (1,), "closed": (1,)}),
    ("a listener added", lambda c: dataclasses.replace(c, listeners=(*c.listeners, ListenerConfig(C, pool="db"))),
     {"kept": KEEP_BOTH, "opened": (2,)}),
    ("a listener removed", lambda c: dataclasses.replace(c, listeners=c.listeners[1:]),
     {"kept": (Kept(1, 0, False),), "closed": (0,)}),
    ("listeners reordered", lambda c: dataclasses.replace(c, listeners=c.listeners[::-1]),
     {"kept": (Kept(1, 0, False), Kept(0, 1, False))}),
    ("a member added", lambda c: pool(c, "db", members=(Address("10.0.0.3", 5432), Address("10.0.0.4", 5432))),
     {"kept": KEEP_BOTH, "pools_updated": ("db",), "members_changed": ("db",)}),
    ("a pool's retries", lambda c: pool(c, "cache", retries=0), {"kept": KEEP_BOTH, "pools_updated": ("cache",)}),
    ("a pool's health checks", lambda c: pool(c, "cache", health=HealthConfig(interval=5.0)),
     {"kept": KEEP_BOTH, "pools_updated": ("cache",), "health_changed": ("cache",)}),
    ("a pool added", add_cold_pool, {"kept": KEEP_BOTH, "pools_added": ("cold",)}),
    ("a pool and its listener removed",
     lambda c: dataclasses.replace(c, listeners=c.listeners[:1], pools=c.pools[:1]),
     {"kept": (Kept(0, 0, False),), "closed": (1,), "pools_removed": ("db",)}),
    ("a pool starts originating TLS", lambda c: pool(c, "db", tls=UpstreamTLSConfig(ca="ca.pem")),
     {"kept": (Kept(0, 0, False), Kept(1, 1, True)), "pools_updated": ("db",), "health_changed": ("db",),
      "tls_pools": ("db",)}),
    ("the drain timeout and the log level", lambda c: dataclasses.replace(c, drain_timeout=5.0, log_level="debug"),
     {"kept": KEEP_BOTH, "process": ("drain_timeout", "log_level")}),
    ("workers and the access log", lambda c: dataclasses.replace(c, workers=4, access_log="/tmp/x.log"),
     {"kept": KEEP_BOTH, "restart": ("workers", "access_log")}),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "expected"), [(e, x) for _, e, x in CASES], ids=[name for name, _, _ in CASES])
def test_plan(edit: Edit, expected: dict[str, Any]) -> None:
    old = base()
    new = edit(old)
    steps = plan(old, new)
    runs = dataclasses.replace(new, workers=old.workers, access_log=old.access_log)
    assert steps == Plan(old=old, new=runs, **expected)


def test_tls_of_kept_listeners_and_pools_is_read_again_but_not_of_rebuilt_or_added_ones() -> None:
    old = listener(pool(base(), "db", tls=UpstreamTLSConfig()), 0, tls=TLS)
    new = add_cold_pool(listener(pool(old, "cold", tls=UpstreamTLSConfig()), 1, idle_timeout=5.0))
    new = pool(new, "cold", tls=UpstreamTLSConfig())
    steps = plan(old, new)
    assert steps.tls_listeners == (0,)
    assert steps.tls_pools == ("db",)  # cold builds its context when it is added
    new = listener(new, 0, idle_timeout=5.0)
    assert plan(old, new).tls_listeners == ()  # a rebuilt Frontend reads its files as it is built


def test_restart_only_settings_keep_their_running_values() -> None:
    old = base()
    steps = plan(old, dataclasses.replace(old, workers=3, access_log="off", drain_timeout=1.0))
    assert (steps.new.workers, steps.new.access_log, steps.new.drain_timeout) == (1, "-", 1.0)


def test_summary_counts_each_kind() -> None:
    old = base()
    new = add_cold_pool(listener(dataclasses.replace(old, listeners=old.listeners[:1]), 0, idle_timeout=9.0))
    new = dataclasses.replace(new, listeners=(*new.listeners, ListenerConfig(C, pool="cold")), log_level="debug")
    assert plan(old, new).summary() == (
        "listeners: 0 kept, 1 rebuilt, 1 opened, 1 closed; pools: 2 unchanged, 0 updated, 1 added, 0 removed;"
        " settings: log_level"
    )


def test_a_listener_on_any_free_port_is_matched_by_name_too() -> None:
    anywhere = Address("127.0.0.1", 0)
    old = dataclasses.replace(base(), listeners=(ListenerConfig(anywhere, pool="db", name="a"),))
    other = ListenerConfig(anywhere, pool="db", name="b")
    assert plan(old, dataclasses.replace(old, listeners=(other,))).opened == (0,)
    assert plan(old, old).kept == (Kept(0, 0, False),)
