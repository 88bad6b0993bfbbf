"""What the kernel does with the accept queue of a SO_REUSEPORT listener that closes, as a killed
worker's does (``tests/reuseport.py``): the clients still queued there are reset, while those of the
other listener are not touched; with ``net.ipv4.tcp_migrate_req=1`` (set only in a network namespace
the test makes) they move to the other listener, which is woken to accept them, and none is reset.
docs/reliability.md case 41."""

from __future__ import annotations

import pytest

from ..reuseport import CLIENTS, MIGRATE, in_netns, queue


@pytest.mark.skipif(MIGRATE.read_text().strip() != "0", reason="this host migrates queued connections")
def test_a_closed_listener_resets_the_clients_in_its_queue() -> None:
    result = queue()
    assert result["reset"] == CLIENTS - result["own"] > 0, result
    assert result["moved"] == 0, result


def test_with_tcp_migrate_req_the_queue_moves_to_the_other_listener() -> None:
    without, with_migration = in_netns("queue", 0), in_netns("queue", 1)
    if without is None or with_migration is None:
        pytest.skip("no network namespace of our own here (unshare is not permitted)")
    assert without["reset"] == CLIENTS - without["own"] > 0 and without["moved"] == 0, without
    assert with_migration["woken"] and with_migration["reset"] == 0, with_migration
    assert with_migration["moved"] == CLIENTS - with_migration["own"] > 0, with_migration
