"""Expected mail (`[[heartbeat]]`): its state is kept per name, replaced whole, and survives
closing and reopening the store (a restart of `gateway serve`)."""

from __future__ import annotations

from gateway.store import HeartbeatState, Store
from tests.store_support import Backend


def test_a_new_store_has_no_heartbeats(store: Store) -> None:
    assert store.mail_heartbeats() == []


def test_heartbeat_state_is_saved_replaced_and_listed_by_name(store: Store) -> None:
    backup = HeartbeatState("nightly-backup", "ops", watched_since=1000.0)
    store.save_mail_heartbeat(backup)
    store.save_mail_heartbeat(HeartbeatState("a-cron", "ops", watched_since=5.0))
    seen = HeartbeatState("nightly-backup", "ops", 1000.0, last_seen=2000.5, last_message=7)
    store.save_mail_heartbeat(seen)
    assert store.mail_heartbeats() == [HeartbeatState("a-cron", "ops", 5.0), seen]
    missing = HeartbeatState("nightly-backup", "ops", 1000.0, 2000.5, 7, missing_since=99999.0)
    store.save_mail_heartbeat(missing)
    assert store.mail_heartbeats()[1] == missing


def test_heartbeat_state_joins_the_surrounding_transaction(store: Store) -> None:
    try:
        with store.transaction():
            store.save_mail_heartbeat(HeartbeatState("x", "ops", 1.0))
            raise RuntimeError("the decision failed")
    except RuntimeError:
        pass
    assert store.mail_heartbeats() == []


def test_heartbeat_state_survives_reopening_the_store(backend: Backend) -> None:
    first = backend.open()
    first.save_mail_heartbeat(HeartbeatState("nightly-backup", "ops", 1.0, 2.0, 3, 4.0))
    first.close()
    assert backend.open().mail_heartbeats() == [
        HeartbeatState("nightly-backup", "ops", 1.0, 2.0, 3, 4.0)
    ]
