"""Which node accepted each mail and which recorded each delivery (several may share a store)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from gateway.node import set_node
from gateway.store import OutboxResult, Store
from tests.store_support import mail


@pytest.fixture
def node() -> Iterator[None]:
    yield
    set_node("")


@pytest.mark.usefixtures("node")
def test_the_accepting_and_the_delivering_node_are_recorded(store: Store) -> None:
    set_node("mx1")
    [accepted] = store.accept([mail("n1")])
    item = store.add_outbox("pagerduty", "helpdesk", "k", {"n": 1}, None)
    set_node("mx2")
    [claimed] = store.claim_outbox(time.time(), 1, None, 60.0, owner="mx2:1")
    store.record_outbox([OutboxResult(claimed.id, "done", response="202")])
    record = store.message(accepted.id)
    assert record is not None and record.node == "mx1"
    delivered = store.outbox_item(item)
    assert delivered is not None and delivered.delivered_by == "mx2"
