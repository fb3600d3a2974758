"""Issue 12 items 4: the storm absorber. Repeat triggers of an open incident coalesce into the
event already queued (or sent) instead of queueing one event per mail; a resolve keeps its
place; absorbed repeats are visible with their count and latest details; a new case is claimed
ahead of busy keys; the per-routing-key rate limit is on by default and holds events back in
the outbox (unclaimed, visible as throttled) while new cases take the budget first."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli.listings import incident_json
from gateway.config import PagerDutySettings, ServiceSettings, WebSettings, load_config
from gateway.decide.events import build_event, pagerduty_order_key
from gateway.decide.processor import Processor, load_services
from gateway.decide.verdicts import Processed
from gateway.delivery.dispatch import Deliveries
from gateway.delivery.outbox import Dispatcher, RetryPolicy
from gateway.delivery.pagerduty import RateBudget
from gateway.intake.spool import incoming
from gateway.outcomes import Outcome
from gateway.store import OutboxItem, OutboxResult, Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.cli_support import Cli, config_with_secrets
from tests.conftest import RULES_DIR, desk_mail, write_config
from tests.ops_support import metric
from tests.pdserver import PagerDutyStandIn
from tests.web_support import SMTP_UP, call, service

KEY = "R" * 32


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    opened = open_store(db)
    yield opened
    opened.close()


@pytest.fixture
def processor(store: Store) -> Processor:
    settings = ServiceSettings("helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), KEY)
    return Processor(store, load_services((settings,)), PagerDutySettings())


def decide(store: Store, processor: Processor, *mails: bytes) -> list[Processed]:
    """Spool `mails` and decide them, in one batch."""
    store.accept([incoming(raw, source="cli", services=("helpdesk",)) for raw in mails])
    return processor.process_pending()


def events(store: Store) -> list[OutboxItem]:
    """Every PagerDuty item, in queue order."""
    items = store.outbox(("pending", "dead", "done"), limit=10_000)
    return [item for item in items if item.kind == "pagerduty"]


def claim(store: Store, limit: int = 10) -> list[OutboxItem]:
    return store.claim_outbox(time.time() + 1, limit, "pagerduty", 60.0, owner="test:1")


def message_id(item: OutboxItem) -> str:
    return item.payload["payload"]["custom_details"]["email_message_id"]


# -- coalescing -------------------------------------------------------------------------------


def test_a_pending_trigger_absorbs_repeats(store: Store, processor: Processor) -> None:
    decide(store, processor, desk_mail("Printer on fire"))
    repeats = decide(store, processor, *(desk_mail("Printer on fire") for _ in range(3)))
    repeats += decide(store, processor, desk_mail("Printer on fire"))  # a later batch too
    [item] = events(store)
    assert item.state == "pending" and item.payload["event_action"] == "trigger"
    for repeat in repeats:
        assert repeat.outcome == Outcome.DUPLICATE and not repeat.queued
        assert repeat.reason.endswith(f"; coalesced into outbox item {item.id}"), repeat.reason
    [incident] = store.incidents()
    assert (incident.trigger_count, incident.coalesced) == (5, 4)


def test_a_resolve_after_a_pending_trigger_keeps_its_order(
    store: Store, processor: Processor
) -> None:
    decide(
        store,
        processor,
        desk_mail("Printer on fire"),
        desk_mail("Printer on fire"),  # absorbed by the pending trigger
        desk_mail("Printer on fire", "Resolved"),
        desk_mail("Printer on fire"),  # after the resolve: opens the incident again
    )
    trigger, resolve, again = events(store)
    assert [e.payload["event_action"] for e in (trigger, resolve, again)] == [
        "trigger",
        "resolve",
        "trigger",
    ]
    assert trigger.id < resolve.id < again.id
    for expected in (trigger, resolve, again):  # one at a time, in that order
        [head] = claim(store)
        assert head.id == expected.id
        store.record_outbox([OutboxResult(head.id, "done", response="202")])
    assert claim(store) == []


def test_an_absorbed_repeat_is_visible_with_its_count(
    store: Store, processor: Processor, db: Path
) -> None:
    decide(store, processor, desk_mail("Printer on fire"))
    decide(store, processor, desk_mail("Printer on fire"), desk_mail("Printer on fire"))
    [item] = events(store)
    [incident] = store.incidents()
    assert incident.coalesced == 2 and incident.coalesced_at is not None
    shown = incident_json(incident)  # `gateway incidents --json`
    assert shown["coalesced"] == 2 and shown["coalesced_at"]
    assert shown["latest_details"]["summary"] == "Printer on fire"  # type: ignore[index]
    jobs = store.jobs(limit=10)
    assert sum(f"coalesced into outbox item {item.id}" in (j.reason or "") for j in jobs) == 2

    thread = StoreThread(db, "web-test")
    try:
        app = WebApp(thread, WebSettings(token="t"), live=LiveState(smtp=SMTP_UP))
        app.services = [service()]
        page = call(app, "GET", "/incident?service=helpdesk&key=Printer+on+fire").text
        assert "2 repeat trigger(s) absorbed" in page
        index = call(app, "GET", "/").text
        [row] = re.findall(r'<tr class="storm">(.*?)</tr>', index, re.S)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert cells[:4] == ["helpdesk", "1", "1", "2"]  # queued, throttled (due), coalesced
        scraped = WebApp(thread, WebSettings(token="t"), live=LiveState())
        metrics = call(scraped, "GET", "/metrics").text
        # every sample also carries the answering node's label (issue 13)
        assert metric(metrics, "gateway_storm_coalesced", service="helpdesk") == 2.0
        assert metric(metrics, "gateway_storm_queued", service="helpdesk") == 1.0
    finally:
        thread.close()


def test_a_coalesced_event_carries_the_latest_details(store: Store, processor: Processor) -> None:
    decide(store, processor, desk_mail("Printer on fire", message_id="<first@helpdesk.example>"))
    decide(store, processor, desk_mail("Printer on fire", message_id="<second@helpdesk.example>"))
    decide(store, processor, desk_mail("Printer on fire", message_id="<latest@helpdesk.example>"))
    [item] = events(store)
    assert message_id(item) == "latest@helpdesk.example"
    [incident] = store.incidents()
    latest = json.loads(incident.latest_details)
    assert latest["custom_details"]["email_message_id"] == "latest@helpdesk.example"
    assert latest["severity"] == "critical"


def test_a_repeat_while_the_trigger_is_in_flight_or_delivered_is_not_sent_again(
    store: Store, processor: Processor
) -> None:
    decide(store, processor, desk_mail("Printer on fire", message_id="<first@helpdesk.example>"))
    [in_flight] = claim(store)
    [repeat] = decide(store, processor, desk_mail("Printer on fire"))
    assert repeat.reason.endswith(f"coalesced into outbox item {in_flight.id}")
    [item] = events(store)
    assert message_id(item) == "first@helpdesk.example"  # what is on the wire stays recorded
    store.record_outbox([OutboxResult(in_flight.id, "done", response="202")])
    [repeat] = decide(store, processor, desk_mail("Printer on fire"))
    assert repeat.reason.endswith(f"coalesced into outbox item {in_flight.id}")
    assert len(events(store)) == 1
    [incident] = store.incidents()
    assert incident.coalesced == 2


def test_a_repeat_after_a_dead_lettered_trigger_is_sent(store: Store, processor: Processor) -> None:
    """PagerDuty never took the first trigger: the repeat is the incident's next chance."""
    decide(store, processor, desk_mail("Printer on fire"))
    [item] = claim(store)
    store.record_outbox([OutboxResult(item.id, "dead", response="bad", error="HTTP 400")])
    [repeat] = decide(store, processor, desk_mail("Printer on fire"))
    assert repeat.queued and "coalesced" not in repeat.reason
    assert [e.state for e in events(store)] == ["dead", "pending"]


def test_an_incident_opened_again_counts_its_repeats_afresh(
    store: Store, processor: Processor
) -> None:
    decide(store, processor, desk_mail("Printer on fire"), desk_mail("Printer on fire"))
    decide(store, processor, desk_mail("Printer on fire", "Resolved"))
    [incident] = store.incidents()
    assert incident.coalesced == 1  # kept while the mirror changes
    decide(store, processor, desk_mail("Printer on fire"))
    [incident] = store.incidents()
    assert (incident.times_opened, incident.coalesced, incident.latest_details) == (2, 0, "")


# -- priority ---------------------------------------------------------------------------------


def test_a_new_case_is_claimed_before_busy_keys(store: Store, processor: Processor) -> None:
    busy = [f"Busy {n}" for n in range(3)]
    decide(store, processor, *(desk_mail(key) for key in busy))
    for item in claim(store):
        store.record_outbox([OutboxResult(item.id, "done", response="202")])
    decide(store, processor, *(desk_mail(key, "Resolved") for key in busy))
    decide(store, processor, desk_mail("Busy 0"))  # opens Busy 0 again, behind its resolve
    decide(store, processor, desk_mail("New case"))
    order = [item.payload["dedup_key"] for item in claim(store, limit=10)]
    assert order == ["New case", "Busy 0", "Busy 1", "Busy 2"]  # the new case first
    resolves = [e for e in events(store) if e.payload["event_action"] == "resolve"]
    assert all(e.lease_owner for e in resolves)
    reopened = [e for e in events(store) if e.payload["dedup_key"] == "Busy 0"][-1]
    assert reopened.payload["event_action"] == "trigger" and not reopened.lease_owner


def test_a_quiet_new_case_goes_ahead_of_a_case_that_keeps_repeating(
    store: Store, processor: Processor
) -> None:
    """Both are first pages; the one mailing in a loop (a storm) gives way to the quiet one,
    which a throttled storm would otherwise keep waiting behind every storming case."""
    decide(store, processor, desk_mail("Storming"))
    decide(store, processor, desk_mail("Storming"), desk_mail("Storming"))
    decide(store, processor, desk_mail("Quiet"))
    assert [item.payload["dedup_key"] for item in claim(store, limit=1)] == ["Quiet"]
    assert [item.payload["dedup_key"] for item in claim(store, limit=1)] == ["Storming"]


# -- the rate limit ---------------------------------------------------------------------------


def test_the_rate_limit_is_on_by_default_in_the_serve_wiring(tmp_path: Path) -> None:
    text = write_config(tmp_path).read_text().replace("rate_limit_per_minute = 0\n", "")
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml")
    assert config.pagerduty.rate_limit_per_minute == 120
    store = StoreThread(config.db_path, "test")
    try:
        transport = httpx.MockTransport(lambda request: httpx.Response(202))
        [dispatcher] = Deliveries(store, transport, config).dispatchers
        assert isinstance(dispatcher.throttle, RateBudget)
        assert dispatcher.throttle.interval == 0.5
    finally:
        store.close()


def test_the_rate_limit_holds_events_back_in_the_outbox_and_new_cases_go_first(
    store: Store, db: Path
) -> None:
    """Two services on one routing key share its budget; another key has its own."""
    keys = {"helpdesk": KEY, "billing": KEY, "ops": "O" * 32}
    with store.transaction():
        for n in range(3):  # busy keys' resolves, queued first
            event = build_event(action="resolve", dedup_key=f"old {n}")
            store.add_outbox(
                "pagerduty", "billing", pagerduty_order_key("billing", f"old {n}"), event, None
            )
        new = build_event(action="trigger", dedup_key="new case", summary="new case")
        store.add_outbox(
            "pagerduty", "helpdesk", pagerduty_order_key("helpdesk", "new case"), new, None, 0
        )
        other = build_event(action="trigger", dedup_key="ops case", summary="ops case")
        store.add_outbox("pagerduty", "ops", pagerduty_order_key("ops", "ops case"), other, None, 0)
    sent: list[str] = []

    async def send(item: OutboxItem) -> str:
        sent.append(item.payload["dedup_key"])
        return "202"

    async def run() -> None:
        thread = StoreThread(db, "test")
        budget = RateBudget(120, keys.get, clock=lambda: 1000.0)  # the clock stands still
        worker = Dispatcher(thread, "pagerduty", send, RetryPolicy(), throttle=budget)
        await worker.run_once()
        await worker.run_once()  # no slot freed: nothing more goes out
        thread.close()

    asyncio.run(run())
    assert sorted(sent) == ["new case", "ops case"]  # one per routing key, new cases first
    waiting = store.outbox(("pending",))
    assert [w.payload["dedup_key"] for w in waiting] == ["old 0", "old 1", "old 2"]
    assert all(not w.lease_owner and w.attempts == 0 for w in waiting)  # held, never claimed
    [billing] = [s for s in store.storm_state(time.time()) if s.service == "billing"]
    assert (billing.queued, billing.throttled) == (3, 3)  # due, unclaimed: held back


def test_a_429_closes_the_routing_keys_budget_for_its_retry_after(tmp_path: Path) -> None:
    clock = [50.0]
    budget = RateBudget(6000, {"helpdesk": KEY}.get, clock=lambda: clock[0])
    from gateway.delivery.pagerduty import PagerDutySender

    transport = httpx.MockTransport(
        lambda request: httpx.Response(429, headers={"Retry-After": "20"}, text="slow down")
    )
    sender = PagerDutySender(
        transport, "http://pd.test/v2/enqueue", {"helpdesk": KEY}, rate_budget=budget
    )
    item = OutboxItem(
        1,
        "pagerduty",
        "helpdesk",
        "k",
        {"event_action": "resolve", "dedup_key": "k"},
        "pending",
        0,
        0.0,
        0.0,
        "",
        "",
    )
    with pytest.raises(Exception, match="HTTP 429"):
        asyncio.run(sender(item))
    clock[0] += 19
    assert budget.admit([item]) == []
    clock[0] += 1.5
    assert budget.admit([item]) == [item]


def test_gateway_incidents_and_messages_show_an_absorbed_repeat(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = Cli(config_with_secrets(tmp_path, pd.url), capsys, monkeypatch)
    cli.ingest(desk_mail("Printer on fire"))
    cli.ingest(desk_mail("Printer on fire"))
    assert [e["event_action"] for e in pd.events] == ["trigger"]  # the repeat was not sent
    table = cli("incidents").out
    header, _, row = table.splitlines()[:3]
    assert "coalesced" in header.split()
    assert re.search(r"Printer on fire\s+triggered\s+2\s+0\s+0\s+1\s", row), table
    [shown] = [json.loads(line) for line in cli("incidents", "--json").out.splitlines()]
    assert shown["coalesced"] == 1 and shown["latest_details"]["severity"] == "critical"
    decisions = [json.loads(line) for line in cli("messages", "--json").out.splitlines()]
    [item] = [i for i in events(open_store(cli.db)) if i.payload["event_action"] == "trigger"]
    reasons = [d.get("reason", "") for d in decisions]
    assert sum(f"coalesced into outbox item {item.id}" in r for r in reasons) == 1, decisions
