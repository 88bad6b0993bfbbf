"""The workers' shared table: per-member counters and status in one anonymous ``mmap``, by member key.

Created by the supervisor before the first fork, so every worker, restarted ones too, maps the same
pages. Every field has exactly one writer, and aligned 8-byte loads and stores are atomic on the
machines we run on, so the counters need no locks (caps aside, below).

**Slots.** Each member of each pool has a slot, allocated by (pool, member key) with headroom
(``capacity``), so a pool can change without re-forking: the supervisor's ``publish`` gives added
members free slots and retires the slots of removed ones; workers find members by key in the slot
entries (pool, key, host, port, position, and for an address found by discovery its name and weight),
never by their place in a list. Per slot:

* ``active[worker][slot]``: the sessions a worker has on the member, written by that worker only
  (``Balancer.acquire/release`` -> ``WorkerView.publish``). A worker's pick sums the column, so
  least-connections is global whichever worker accepted the client.
* ``up[slot]``: 1 while the member is UP; written by the supervisor's health thread only.
* ``fails/oks[worker][slot]``: running counts of each worker's failed and successful connects to the
  member, with the last failure's cause in ``reason[worker][slot]``; written by that worker only.
* ``resets/served[worker][slot]``: running counts of each worker's sessions on the member that it
  reset before a byte, and of those that got its bytes while it had a failure streak; that worker only.
* ``streaky[slot]``: 1 while the supervisor's failure streak of the member is not 0; written by the
  supervisor only. A worker's sessions report that they got bytes (``Pool.served``) only while its
  copy of the member's streak is not 0: raised by its own resets and by ``streaky``, cleared by the
  served session it reports, so it says so about once per 50 ms while the streak lasts.
* ``role[slot]``: a primary pool's routing (``Balancer.restrict``) as the supervisor's prober decided it:
  ``OPEN`` (no restriction), ``CHOSEN`` (the member new sessions may go to), ``LEFT_OUT``, or
  ``SPLIT_OUT`` (left out because several members claim the primary role); written by the supervisor
  only, so a worker tells "no primary yet" (its clients wait in the queue) from a split brain (refused
  at once) as one process does (``restriction``).
* ``share[slot]``: the member's slow-start share (0.1..1.0) of its weight and max_conns, written by
  the supervisor's ramp only; workers copy it into their members every 50 ms (``workers.Follower``).

**Caps.** ``max_conns`` is global, so a check of the summed count followed by an increment would
overshoot when two workers take the last free place at once. ``reserve`` makes the pair atomic under
one ``multiprocessing.Lock`` (a POSIX semaphore in shared memory: taking a free one is an atomic
instruction in user space, no system call), held for the sum of one column and one store. Only capped
members go through it; every other member is counted without a lock, as before. The lock's holder is
written beside it, so when a worker dies holding it, ``clear_worker`` releases it for the others.

**Generation.** ``publish`` makes the generation odd while it writes entries and even when done (a
sequence lock), so a worker's ``snapshot`` retries until it reads one whole generation. A worker that
has applied a generation writes it to ``seen[worker]``. A retired slot is reused only when every worker
has seen its retirement, no worker has a session on it, and it stayed so for one more ``reclaim`` (a
failed dial reports its failure just after releasing its count); its counters then start from zero.

Pure: no sockets, no event loop.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from .balancer import Member, member_keys
from .config import Address, Config, MemberConfig, Resolved, Service, as_member
from .discovery import needs_resolving, unresolved_members
from .errors import ConfigError
from .health import Event

REASON = 96  # bytes kept of a passive failure's cause
ENTRY = 1024  # bytes of one slot's identity and settings: pool, key, host, port, position, name, SRV weight,
# weight, cap, role
FREE, LIVE, RETIRED = 0, 1, 2
DISCOVERED = 256  # more slots for each member given as a DNS name: the addresses it may resolve to
ELIGIBLE, EJECTED = 1, 2  # a member's ``up`` byte: 1 the pick may choose it; 2 ejected (health UP); 0 neither
OPEN, CHOSEN, LEFT_OUT, SPLIT_OUT = 0, 1, 2, 3  # a member's ``role`` byte (see the module's docstring)


@dataclass(frozen=True, slots=True)
class Entry:
    """One live slot as a worker reads it."""

    key: str
    member: MemberConfig
    slot: int

    @property
    def address(self) -> Address | Service:
        return self.member.address


class SharedTable:
    """Per-worker, per-slot counters and per-slot status and identity in one shared mapping.

    Cell ``worker * capacity + slot`` is worker ``worker``'s counter for the member in ``slot``.
    """

    def __init__(self, config: Config, workers: int, capacity: int | None = None) -> None:
        members = sum(len(pool.members) for pool in config.pools)
        named = sum(needs_resolving(member.address) for pool in config.pools for member in pool.members)
        self.workers = workers
        self.capacity = capacity or members + max(members, 64) + DISCOVERED * named
        slots, cells = self.capacity, workers * self.capacity
        words = 8 * cells
        sizes = (
            8 * (2 + workers), words, words, words, words, words, 8 * slots, slots, slots, slots, slots, slots * ENTRY,
            cells * REASON,
        )
        self._map = mmap.mmap(-1, sum(sizes))  # MAP_SHARED | MAP_ANONYMOUS
        view = memoryview(self._map)
        parts = []
        start = 0
        for size in sizes:
            parts.append(view[start : start + size])
            start += size
        header, active, fails, oks, resets, served, share = parts[:7]
        self.up, self.streaky, self.state, self.role, self.entries, self.reasons = parts[7:]
        # [0]: generation, [1 + w]: what worker w has seen, [1 + workers]: 1 + the worker holding ``lock``
        self.header = header.cast("Q")
        self.holder = 1 + workers
        self.active = active.cast("q")
        self.fails = fails.cast("Q")
        self.oks = oks.cast("Q")
        self.resets = resets.cast("Q")
        self.served = served.cast("Q")
        self.share = share.cast("d")
        # for reserve (caps); made before the fork, like the mapping. Imported here: multiprocessing
        # loads socket and selectors, which this module must not pull in just by being imported.
        import multiprocessing

        self.lock = multiprocessing.Lock()
        # the supervisor's own bookkeeping (workers get a copy at fork and never use it)
        self._slots: dict[tuple[str, str], int] = {}  # live and retired slots by (pool, key)
        self._retired: dict[int, int] = {}  # slot -> the generation that retired it
        self._quiet: set[int] = set()  # retired slots found idle by the last reclaim
        self._seen_fails = [0] * cells
        self._seen_oks = [0] * cells
        self._seen_sessions = [(0, 0)] * cells  # resets, served
        for pool in config.pools:
            self.publish(pool.name, unresolved_members(pool.members))

    # layout

    def cell(self, worker: int, slot: int) -> int:
        return worker * self.capacity + slot

    def column(self, slot: int) -> tuple[int, ...]:
        """The cells of every worker for ``slot``."""
        return tuple(self.cell(w, slot) for w in range(self.workers))

    @property
    def generation(self) -> int:
        return self.header[0]

    # the supervisor's side

    def publish(
        self, pool: str, members: Sequence[MemberConfig | Address], down: Collection[str] = ()
    ) -> dict[str, int]:
        """Make ``members`` the pool's members (by key), with their settings; returns each key's slot. New
        members start UP; those whose key is in ``down`` are DOWN (the health thread's pool decides from
        then on). Raises ConfigError, changing nothing, when the free slots do not suffice."""
        configs = [as_member(m) for m in members]
        keys = member_keys([m.address for m in configs])
        wanted = set(keys)
        new = [key for key in keys if (pool, key) not in self._slots]
        free = [slot for slot in range(self.capacity) if self.state[slot] == FREE]
        if len(new) > len(free):
            problem = f"{len(new)} new members, but {len(free)} of the shared table's {self.capacity} slots are free"
            raise ConfigError("upstream", None, problem)
        entries = [
            _encode(pool, key, member, position)
            for position, (key, member) in enumerate(zip(keys, configs, strict=True))
        ]
        if any(len(entry) > ENTRY for entry in entries):
            raise ConfigError("upstream", keys[0], f"a member's name is longer than the table's {ENTRY} bytes")
        self.header[0] += 1  # odd: being written
        gone = self.header[0] + 1
        for (owner, key), slot in self._slots.items():
            if owner == pool and key not in wanted and self.state[slot] == LIVE:
                self.state[slot] = RETIRED
                self._retired[slot] = gone
        for key in new:
            slot = free.pop(0)
            self._fresh(slot)
            self._slots[(pool, key)] = slot
        slots = {key: self._slots[(pool, key)] for key in keys}
        for key, entry in zip(keys, entries, strict=True):
            slot = slots[key]
            self.state[slot] = LIVE
            self._retired.pop(slot, None)
            self._quiet.discard(slot)
            self.entries[slot * ENTRY : (slot + 1) * ENTRY] = entry.ljust(ENTRY, b"\0")
            if key in down:  # a new address: DOWN before any worker can see its entry
                self.up[slot] = 0
        self.header[0] += 1  # even: whole again
        return slots

    def _fresh(self, slot: int) -> None:
        """Zero a slot's counters before a new member takes it; it starts UP."""
        for cell in self.column(slot):
            self.fails[cell] = self.oks[cell] = 0
            self._seen_fails[cell] = self._seen_oks[cell] = 0
            self.resets[cell] = self.served[cell] = 0
            self._seen_sessions[cell] = (0, 0)
            self.set_reason(cell, "")
        self.up[slot] = ELIGIBLE
        self.streaky[slot] = 0
        self.role[slot] = OPEN
        self.share[slot] = 1.0

    def slots(self, pool: str) -> dict[str, int]:
        """The live slots of ``pool`` by member key."""
        return {key: slot for (owner, key), slot in self._slots.items() if owner == pool and self.state[slot] == LIVE}

    def reclaim(self) -> list[int]:
        """Free the retired slots no worker uses any more (see the module's docstring); returns them."""
        freed = []
        for slot, gone in list(self._retired.items()):
            idle = all(self.header[1 + w] >= gone for w in range(self.workers)) and not any(
                self.active[cell] for cell in self.column(slot)
            )
            if not idle:
                self._quiet.discard(slot)
            elif slot not in self._quiet:
                self._quiet.add(slot)
            else:
                self._quiet.discard(slot)
                del self._retired[slot]
                self.state[slot] = FREE
                self._slots = {k: s for k, s in self._slots.items() if s != slot}
                freed.append(slot)
        return freed

    def passive(self, slot: int) -> tuple[int, int, str]:
        """The failed and successful connects every worker recorded on ``slot`` since the last call,
        and the cause of the latest failure."""
        failed = succeeded = 0
        reason = ""
        for cell in self.column(slot):
            fails, oks = self.fails[cell], self.oks[cell]
            if fails != self._seen_fails[cell]:
                failed += fails - self._seen_fails[cell]
                self._seen_fails[cell] = fails
                reason = self.reason(cell)
            succeeded += oks - self._seen_oks[cell]
            self._seen_oks[cell] = oks
        return failed, succeeded, reason

    def sessions(self, slot: int) -> tuple[int, int]:
        """The sessions every worker recorded on ``slot`` since the last call that the member reset
        before a byte, and that got its bytes (while it had a streak)."""
        resets = served = 0
        for cell in self.column(slot):
            now = self.resets[cell], self.served[cell]
            seen = self._seen_sessions[cell]
            if now != seen:
                resets += now[0] - seen[0]
                served += now[1] - seen[1]
                self._seen_sessions[cell] = now
        return resets, served

    def clear_worker(self, worker: int) -> None:
        """A worker died: its sessions are gone (its passive counts stay: they only ever grow), and its
        replacement has seen nothing yet."""
        for slot in range(self.capacity):
            self.active[self.cell(worker, slot)] = 0
        self.header[1 + worker] = 0
        if self.header[self.holder] == 1 + worker:  # it died inside reserve: free the lock for the others
            self.header[self.holder] = 0
            self.lock.release()

    # a worker's side

    def snapshot(self) -> tuple[int, dict[str, list[Entry]]]:
        """One whole generation: its number and each pool's live members in their configured order."""
        while True:
            generation = self.header[0]
            if generation % 2:
                continue  # the supervisor is writing: a few microseconds
            found: dict[str, list[tuple[int, Entry]]] = {}
            for slot in range(self.capacity):
                if self.state[slot] == LIVE:
                    pool, key, member, position = _decode(self.entries[slot * ENTRY : (slot + 1) * ENTRY])
                    found.setdefault(pool, []).append((position, Entry(key, member, slot)))
            if self.header[0] == generation:
                return generation, {pool: [e for _, e in sorted(items, key=_first)] for pool, items in found.items()}

    def saw(self, worker: int, generation: int) -> None:
        """Worker ``worker`` now works with ``generation``."""
        self.header[1 + worker] = generation

    def reason(self, cell: int) -> str:
        raw = self.reasons[cell * REASON : (cell + 1) * REASON].tobytes()
        return raw.rstrip(b"\0").decode("utf-8", "replace")

    def set_reason(self, cell: int, text: str) -> None:
        raw = text.encode("utf-8", "replace")[:REASON]
        self.reasons[cell * REASON : (cell + 1) * REASON] = raw.ljust(REASON, b"\0")


def restriction(role: memoryview, slots: Iterable[int]) -> tuple[frozenset[int] | None, bool]:
    """The restriction the ``role`` bytes of a pool's ``slots`` publish: the slots new sessions may go
    to (None: no restriction), and whether they are none because of a split brain."""
    roles = {slot: role[slot] for slot in slots}
    if not any(roles.values()):
        return None, False
    allowed = frozenset(slot for slot, value in roles.items() if value == CHOSEN)
    return allowed, not allowed and SPLIT_OUT in roles.values()


def _first(pair: tuple[int, Entry]) -> int:
    return pair[0]


def _encode(pool: str, key: str, member: MemberConfig, position: int) -> bytes:
    address = member.address
    if not isinstance(address, Address):
        raise ConfigError("upstream", str(address), "an SRV name has no slot until it is resolved")
    name, srv_weight = (address.name, address.weight) if isinstance(address, Resolved) else ("", 1)
    fields = (address.host, address.port, position, name, srv_weight, member.weight, member.max_conns or 0)
    return "\0".join((pool, key, *map(str, fields), str(int(member.backup)))).encode()


def _decode(raw: memoryview) -> tuple[str, str, MemberConfig, int]:
    pool, key, host, port, position, name, srv_weight, weight, cap, backup = (
        raw.tobytes().rstrip(b"\0").decode().split("\0")
    )
    address = Resolved(host, int(port), name=name, weight=int(srv_weight)) if name else Address(host, int(port))
    member = MemberConfig(address, int(weight), int(cap) or None, backup == "1")
    return pool, key, member, int(position)


class WorkerView:
    """The ``balancer.LoadView`` of one worker: global counts and status, writes to its own cells."""

    __slots__ = ("_acquire", "_active", "_columns", "_header", "_holder", "_me", "_own", "_release", "_role", "_up")

    def __init__(self, table: SharedTable, worker: int) -> None:
        self._active = table.active
        self._up = table.up
        self._role = table.role
        self._columns = [table.column(slot) for slot in range(table.capacity)]
        self._own = [table.cell(worker, slot) for slot in range(table.capacity)]
        self._acquire = table.lock.acquire  # the semaphore's own C methods: no Python frame per call
        self._release = table.lock.release
        self._header = table.header
        self._holder = table.holder
        self._me = 1 + worker

    def active(self, slot: int) -> int:
        counts = self._active
        total = 0
        for cell in self._columns[slot]:
            total += counts[cell]
        return total

    def up(self, slot: int) -> bool:
        return self._up[slot] == ELIGIBLE

    def publish(self, slot: int, active: int) -> None:
        self._active[self._own[slot]] = active

    def restriction(self, slots: Iterable[int]) -> tuple[bool, bool]:
        """Whether the supervisor now routes the members in ``slots`` to any (or leaves them unrestricted),
        and whether to none because of a split brain: read at the moment a client finds no member, not at
        the worker's last look, so a client that comes just after a demotion waits for the next primary."""
        allowed, split = restriction(self._role, slots)
        return allowed is None or bool(allowed), split

    def reserve(self, slot: int, limit: int, active: int) -> bool:
        """Count a session on a capped member unless every worker's sessions on it already reach
        ``limit``. Increments of capped members happen only here, under the lock; a decrement elsewhere
        only lowers the sum read, so the cap is never exceeded."""
        counts = self._active
        header, holder = self._header, self._holder
        self._acquire()
        try:
            header[holder] = self._me
            total = 0
            for cell in self._columns[slot]:
                total += counts[cell]
            room = total < limit
            if room:
                counts[self._own[slot]] = active
            header[holder] = 0
        finally:
            self._release()
        return room


def forwarder(table: SharedTable, worker: int) -> Callable[[Member, Event, str], None]:
    """``Pool.forward`` for a worker: passive results to the worker's own counters; probes never run."""
    fails, oks = table.fails, table.oks
    first = table.cell(worker, 0)

    def forward(member: Member, event: Event, reason: str) -> None:
        cell = first + member.slot
        if event is Event.TRAFFIC_OK:
            oks[cell] += 1
        elif event is Event.TRAFFIC_FAIL:
            table.set_reason(cell, reason)  # before the count, so the supervisor reads this cause
            fails[cell] += 1
        elif event is Event.TRAFFIC_RESET:
            table.resets[cell] += 1
            member.outlier.streak = 1  # so this worker's next served session says so (Pool.served)
        elif event is Event.TRAFFIC_SERVED:
            table.served[cell] += 1
            member.outlier.streak = 0  # said once; raised again by a reset or the supervisor (streaky)

    return forward
