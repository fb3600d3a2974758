"""Events API v2 body, status mapping, and the outbox worker's retries, order and dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from gateway.config import PagerDutySettings
from gateway.decide.events import build_event
from gateway.delivery.http11 import KeepAliveTransport
from gateway.delivery.outbox import Dispatcher, RetryPolicy
from gateway.delivery.pagerduty import PagerDutySender, RateBudget, classify_response
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem, StoreThread, open_store
from tests.conftest import ROUTING_KEY
from tests.pdserver import PagerDutyStandIn, validate_event

FAST = RetryPolicy(first_delay=0.01, max_delay=0.05, give_up_after=60)


def test_trigger_event_follows_the_contract() -> None:
    event = build_event(
        action="trigger",
        dedup_key="Printer on fire",
        summary="x" * 2000,
        severity="critical",
        details={"case": "29"},
        links=[{"href": "https://desk.example/29", "text": "Case"}, {"href": "", "text": "empty"}],
    )
    assert validate_event({"routing_key": ROUTING_KEY, **event}) is None
    assert len(event["payload"]["summary"]) == 1024
    assert event["payload"]["custom_details"] == {"case": "29"}
    assert event["links"] == [{"href": "https://desk.example/29", "text": "Case"}]
    assert event["client"] == "email-gateway"


def test_resolve_event_is_minimal() -> None:
    assert build_event(action="resolve", dedup_key="k") == {
        "event_action": "resolve",
        "dedup_key": "k",
    }


def test_oversized_details_are_shortened_under_512kb() -> None:
    event = build_event(
        action="trigger", dedup_key="k", summary="s", details={"body": "y" * 2_000_000}
    )
    assert len(json.dumps(event).encode()) < 512 * 1024


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        pytest.param(202, {}, None, id="accepted"),
        pytest.param(400, {}, RejectedDeliveryError, id="invalid-event"),
        pytest.param(429, {"Retry-After": "7"}, TemporaryDeliveryError, id="rate-limited"),
        pytest.param(500, {}, TemporaryDeliveryError, id="server-error"),
        pytest.param(503, {}, TemporaryDeliveryError, id="unavailable"),
    ],
)
def test_status_mapping(status: int, headers: dict, error: type | None) -> None:
    response = httpx.Response(status, headers=headers, text='{"status":"x"}')
    if error is None:
        assert classify_response(response) == '{"status":"x"}'
        return
    with pytest.raises(error) as info:
        classify_response(response)
    if status == 429:
        assert info.value.retry_after == 7.0


def test_retry_after_is_honoured() -> None:
    assert RetryPolicy(first_delay=0.01).delay(0, retry_after=30) >= 30


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(first_delay=1, max_delay=60)
    assert 0.5 <= policy.delay(0) <= 1
    assert 4 <= policy.delay(3) <= 8
    assert policy.delay(40) <= 60


def test_network_errors_are_temporary() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def send() -> None:
        sender = PagerDutySender(
            httpx.MockTransport(refuse), "http://pd/v2/enqueue", {"s": ROUTING_KEY}
        )
        await sender(_item("s"))

    with pytest.raises(TemporaryDeliveryError, match="connection error"):
        asyncio.run(send())


def test_reconfigure_switches_url_and_routing_keys() -> None:
    seen: list[tuple[str, str]] = []

    def accept(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), json.loads(request.content)["routing_key"]))
        return httpx.Response(202, text='{"status":"success"}')

    async def send_twice() -> None:
        sender = PagerDutySender(
            httpx.MockTransport(accept), "http://old/v2/enqueue", {"s": ROUTING_KEY}
        )
        await sender(_item("s"))
        sender.reconfigure("http://new/v2/enqueue", {"s": "N" * 32})  # a rotated key
        await sender(_item("s"))

    asyncio.run(send_twice())
    assert seen == [("http://old/v2/enqueue", ROUTING_KEY), ("http://new/v2/enqueue", "N" * 32)]


def _item(service: str):
    from gateway.store import OutboxItem

    return OutboxItem(
        1,
        "pagerduty",
        service,
        "k",
        {"event_action": "resolve", "dedup_key": "k"},
        "pending",
        0,
        time.time(),
        time.time(),
        "",
        "",
    )


def _queue(db: Path, *events: tuple[str, str]) -> None:
    store = open_store(db)
    with store.transaction():
        for action, key in events:
            payload = build_event(action=action, dedup_key=key, summary=key)
            store.add_outbox("pagerduty", "helpdesk", f"pagerduty:helpdesk:{key}", payload, None)
    store.close()


async def _drain(db: Path, pd: PagerDutyStandIn, seconds: float = 10.0) -> None:
    store = StoreThread(db)
    try:
        async with KeepAliveTransport() as transport:
            sender = PagerDutySender(transport, pd.url, {"helpdesk": ROUTING_KEY}, timeout=5)
            worker = Dispatcher(store, "pagerduty", sender, FAST)
            deadline = time.time() + seconds
            while time.time() < deadline:
                await worker.run_once()
                pending, _ = await store.call(lambda s: s.outbox_stats())
                if not pending:
                    return
                await asyncio.sleep(0.01)
    finally:
        store.close()


def test_500_then_202_delivers_once_in_order(tmp_path: Path, pd: PagerDutyStandIn) -> None:
    db = tmp_path / "g.sqlite3"
    _queue(db, ("trigger", "A"), ("resolve", "A"), ("trigger", "B"))
    pd.fail_next(3, 500)
    asyncio.run(_drain(db, pd))
    actions = [(e["event_action"], e["dedup_key"]) for e in pd.events]
    assert sorted(actions) == sorted([("trigger", "A"), ("resolve", "A"), ("trigger", "B")])
    assert actions.index(("trigger", "A")) < actions.index(("resolve", "A"))
    assert len(pd.requests) == 6  # 3 failures + 3 deliveries, nothing sent twice after a 202


def test_400_is_a_dead_letter_with_the_response(tmp_path: Path, pd: PagerDutyStandIn) -> None:
    db = tmp_path / "g.sqlite3"
    store = open_store(db)
    with store.transaction():
        store.add_outbox(
            "pagerduty", "helpdesk", "k", {"event_action": "trigger", "dedup_key": "k"}, None
        )
    asyncio.run(_drain(db, pd, seconds=2))
    dead = store.outbox(("dead",))
    assert len(dead) == 1 and dead[0].attempts == 1
    assert "payload" in dead[0].response and "HTTP 400" in dead[0].last_error
    assert len(pd.requests) == 1  # never retried


def test_gives_up_after_the_configured_time(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite3"
    _queue(db, ("trigger", "A"))

    async def run() -> None:
        store = StoreThread(db)
        clock = [time.time() + 7200]  # the item is two hours old

        async def always_down(item):
            raise TemporaryDeliveryError("HTTP 503")

        worker = Dispatcher(
            store, "pagerduty", always_down, RetryPolicy(give_up_after=3600), clock=lambda: clock[0]
        )
        await worker.run_once()
        store.close()

    asyncio.run(run())
    dead = open_store(db).outbox(("dead",))
    assert len(dead) == 1 and dead[0].last_error.startswith("gave up after 1 attempts")


def budget_item(n: int, service: str) -> OutboxItem:
    return OutboxItem(n, "pagerduty", service, f"k{n}", {}, "pending", 0, 0.0, 0.0, "", "")


def test_the_rate_limit_is_on_by_default_at_pagerdutys_documented_rate() -> None:
    assert PagerDutySettings().rate_limit_per_minute == 120


def test_the_rate_budget_limits_each_routing_key_on_its_own() -> None:
    clock = [100.0]
    keys = {"a": "KEY-A", "a2": "KEY-A", "b": "KEY-B"}
    budget = RateBudget(120, keys.get, clock=lambda: clock[0])  # one per 0.5 s and key
    items = [budget_item(1, "a"), budget_item(2, "a2"), budget_item(3, "b"), budget_item(4, "a")]
    assert [i.id for i in budget.admit(items)] == [1, 3]  # a and a2 share KEY-A
    assert budget.held_back == 2 and budget.wait_seconds() == 0.5
    clock[0] += 0.25
    assert budget.admit(items[1:2]) == []
    clock[0] += 0.25
    assert [i.id for i in budget.admit(items[1:])] == [2, 3]
    clock[0] += 0.5
    assert [i.id for i in budget.admit(items, limit=1)] == [1]  # no slot spent beyond the room
    assert [i.id for i in budget.admit(items[2:])] == [3]
    budget.penalize("KEY-B", 30.0)  # a 429 with Retry-After: 30
    clock[0] += 1.0
    assert [i.id for i in budget.admit([budget_item(5, "b"), budget_item(6, "a")])] == [6]
