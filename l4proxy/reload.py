"""What a reload changes: the running Config and the new one in, a ``Plan`` out (``plan``).

``Proxy.apply`` carries a plan out; this module only decides, so every decision is a table test.

**Listeners** are matched by address, not by name: a listener whose address is unchanged keeps its
listening socket (renamed or not; on port 0, any free port, by name too), so not one client is refused
while the file changes. When its settings changed (or its pool, or whether its pool originates TLS,
which decides the splice engine) it gets a new ``Frontend`` around the same socket (``rebuilt``): new
clients see the new settings, sessions already open keep the ones they started with. A listener at a
new address is opened; one whose address left the file stops accepting, and its sessions drain.

**Pools** are matched by name: a pool in both files changes in place (``Pool.update``: members that
stay keep their health and sessions), one only in the new file is added, one only in the old file is
removed once no listener routes to it (its sessions drain).

**TLS**: every certificate, key and CA of a listener or pool that stays is read again (a file may
change under the same path); rebuilt listeners and added pools read theirs when they are built.

**Process settings**: ``drain_timeout`` and ``log_level`` take effect at once; ``workers``,
``access_log`` and ``admin`` (the endpoint's address) need a new process (see README, Upgrade), so the
plan keeps their running values (``new``) and names them in ``restart``.

Pure: no sockets, no event loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .config import Config, ListenerConfig, PoolConfig

RESTART = ("workers", "access_log", "admin")  # process settings a running process cannot change
_PROCESS = tuple(f.name for f in fields(Config) if f.name not in ("listeners", "pools"))


@dataclass(frozen=True, slots=True)
class Kept:
    """A listener whose address stays: ``old`` is its place in the running Config, ``new`` in the new."""

    old: int
    new: int
    rebuilt: bool  # a new Frontend around the same socket


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a reload does, by listener index (into ``old.listeners``/``new.listeners``) and pool name."""

    old: Config
    new: Config  # what runs once the plan is applied (restart-only settings as they were)
    kept: tuple[Kept, ...] = ()
    opened: tuple[int, ...] = ()  # new listeners (index into new.listeners)
    closed: tuple[int, ...] = ()  # listeners that go (index into old.listeners)
    pools_added: tuple[str, ...] = ()
    pools_updated: tuple[str, ...] = ()  # in both, with something changed
    pools_removed: tuple[str, ...] = ()
    members_changed: tuple[str, ...] = ()  # updated pools whose member list changed
    health_changed: tuple[str, ...] = ()  # updated pools whose probes must restart
    tls_listeners: tuple[int, ...] = ()  # kept, not rebuilt, with TLS: re-read (index into new.listeners)
    tls_pools: tuple[str, ...] = ()  # pools that stay and originate TLS: re-read
    process: tuple[str, ...] = ()  # process settings changed and applied now
    restart: tuple[str, ...] = ()  # process settings changed that need a new process (not applied)

    def summary(self) -> str:
        """One log line: ``listeners: 1 kept, 1 rebuilt, 1 opened, 0 closed; pools: ...``."""
        rebuilt = sum(k.rebuilt for k in self.kept)
        listeners = (
            f"listeners: {len(self.kept) - rebuilt} kept, {rebuilt} rebuilt, {len(self.opened)} opened,"
            f" {len(self.closed)} closed"
        )
        unchanged = len(self.new.pools) - len(self.pools_added) - len(self.pools_updated)
        pools = (
            f"pools: {unchanged} unchanged, {len(self.pools_updated)} updated, {len(self.pools_added)} added,"
            f" {len(self.pools_removed)} removed"
        )
        process = f"; settings: {', '.join(self.process)}" if self.process else ""
        return f"{listeners}; {pools}{process}"


def plan(old: Config, new: Config) -> Plan:
    """The plan that turns the running ``old`` into ``new``."""
    restart = tuple(name for name in RESTART if getattr(old, name) != getattr(new, name))
    new = dataclasses.replace(new, **{name: getattr(old, name) for name in restart})
    old_pools = {p.name: p for p in old.pools}
    new_pools = {p.name: p for p in new.pools}
    updated = tuple(name for name, p in new_pools.items() if name in old_pools and old_pools[name] != p)
    kept, opened, closed = _listeners(old, new, old_pools, new_pools)
    rebuilt = {k.new for k in kept if k.rebuilt}
    return Plan(
        old=old,
        new=new,
        kept=kept,
        opened=opened,
        closed=closed,
        pools_added=tuple(name for name in new_pools if name not in old_pools),
        pools_updated=updated,
        pools_removed=tuple(name for name in old_pools if name not in new_pools),
        members_changed=tuple(n for n in updated if old_pools[n].members != new_pools[n].members),
        health_changed=tuple(n for n in updated if _probing(old_pools[n]) != _probing(new_pools[n])),
        tls_listeners=tuple(k.new for k in kept if k.new not in rebuilt and new.listeners[k.new].tls is not None),
        tls_pools=tuple(n for n, p in new_pools.items() if n in old_pools and p.tls is not None),
        process=tuple(name for name in _PROCESS if name not in restart and getattr(old, name) != getattr(new, name)),
        restart=restart,
    )


def _listeners(
    old: Config, new: Config, old_pools: dict[str, PoolConfig], new_pools: dict[str, PoolConfig]
) -> tuple[tuple[Kept, ...], tuple[int, ...], tuple[int, ...]]:
    """Listeners matched by address, each old one at most once, in order."""
    unmatched = dict(enumerate(old.listeners))
    kept: list[Kept] = []
    opened: list[int] = []
    for index, listener in enumerate(new.listeners):
        match = next((i for i, o in unmatched.items() if _same(o, listener)), None)
        if match is None:
            opened.append(index)
            continue
        before = unmatched.pop(match)
        rebuilt = _frontend(before, old_pools) != _frontend(listener, new_pools)
        kept.append(Kept(match, index, rebuilt))
    return tuple(kept), tuple(opened), tuple(unmatched)


def _same(old: ListenerConfig, new: ListenerConfig) -> bool:
    """Whether ``new`` is at ``old``'s address: port 0 (any free port) says nothing, so there the name
    decides too."""
    return old.address == new.address and (new.address.port != 0 or old.name == new.name)


def _frontend(listener: ListenerConfig, pools: dict[str, PoolConfig]) -> tuple[object, ...]:
    """What a Frontend is built from: its settings (not its name, which nothing at run time reads),
    its pool, and whether that pool speaks TLS (a TLS upstream rules out the splice engine)."""
    return dataclasses.replace(listener, name=""), pools[listener.pool].tls is not None


def _probing(pool: PoolConfig) -> tuple[object, ...]:
    """What the probers of a pool are built from: a change restarts them."""
    return pool.health, pool.tls
