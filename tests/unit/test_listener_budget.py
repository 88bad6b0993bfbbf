"""The listener's descriptor budget (``listener.py``): an accept tests ``accepted`` against the count at
which the budget is spent, which must say exactly what the budget does (descriptors free at the last
count, less ``per_session`` for each client accepted since), whatever the count found."""

from __future__ import annotations

import pytest

from l4proxy.config import Address, ListenerConfig
from l4proxy.listener import Listener


@pytest.mark.parametrize("per_session", [2, 8])
@pytest.mark.parametrize("free", [-5, 0, 1, 2, 3, 15, 16, 17, 1000])
def test_an_accept_has_room_exactly_while_the_budget_holds_a_session(
    monkeypatch: pytest.MonkeyPatch, per_session: int, free: int
) -> None:
    listener = Listener(ListenerConfig(Address("127.0.0.1", 0)), lambda sock, address: None, per_session)
    listener.accepted = 37  # clients accepted before the count
    monkeypatch.setattr("l4proxy.listener._open_descriptors", lambda: 0)
    listener._fd_limit = free + 16  # less the reserve: ``free`` descriptors
    listener._count()
    assert listener._budget == free
    for accepted in range(1, free // per_session + 3):
        listener.accepted += 1  # as _accept does
        assert listener._budget == free - accepted * per_session
        assert (listener.accepted < listener._until) == (listener._budget >= per_session), accepted
