"""What PagerDuty was told about an incident (issue 11, item 10): the pure rule, and
`gateway incidents` / `gateway check` saying it through the real CLI."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.decide.events import pagerduty_order_key as order_key
from gateway.delivery.paging import DeliveryState, incident_delivery
from gateway.store import OutboxItem
from tests.conftest import desk_mail, write_config
from tests.pdserver import PagerDutyStandIn
from tests.test_pipeline import Gateway


def item(
    id: int, state: str, action: str = "trigger", attempts: int = 1, error: str = ""
) -> OutboxItem:
    payload = {"event_action": action, "dedup_key": "k"}
    now = time.time()
    return OutboxItem(
        id,
        "pagerduty",
        "helpdesk",
        "pagerduty:helpdesk:k",
        payload,
        state,
        attempts,
        now,
        now,
        error,
        "",
    )


@pytest.mark.parametrize(
    ("items", "local", "state", "reason"),
    [
        pytest.param([item(1, "done")], False, DeliveryState.DELIVERED, "", id="delivered"),
        pytest.param(
            [item(1, "pending", attempts=0)],
            False,
            DeliveryState.PENDING,
            "the trigger (#1) is queued, not tried yet",
            id="queued",
        ),
        pytest.param(
            [item(2, "pending", "resolve", 0), item(1, "pending", error="HTTP 503")],
            False,
            DeliveryState.PENDING,
            "the trigger (#1): 1 attempt(s) failed, last: HTTP 503",
            id="head-of-queue",
        ),
        pytest.param(
            [item(1, "dead", error="HTTP 400: bad")],
            False,
            DeliveryState.NOT_DELIVERED,
            "the trigger (#1) is a dead letter: HTTP 400: bad",
            id="dead",
        ),
        pytest.param(
            [item(2, "dead", "resolve", error="HTTP 400"), item(1, "done")],
            False,
            DeliveryState.NOT_DELIVERED,
            "the resolve (#2) is a dead letter: HTTP 400",
            id="dead-resolve-after-trigger",
        ),
        pytest.param(
            [item(2, "done"), item(1, "dead", error="x")],
            False,
            DeliveryState.DELIVERED,
            "an earlier event is a dead letter (#1)",
            id="delivered-after-dead",
        ),
        pytest.param(
            [],
            True,
            DeliveryState.NOT_DELIVERED,
            "local mode (no routing_key): nothing is sent to PagerDuty",
            id="local-mode",
        ),
        pytest.param(
            [],
            False,
            DeliveryState.UNKNOWN,
            "no PagerDuty event on record (decided without a routing_key, or past retention)",
            id="no-record",
        ),
    ],
)
def test_incident_delivery_state(
    items: list[OutboxItem], local: bool, state: DeliveryState, reason: str
) -> None:
    delivery = incident_delivery(items, local=local)
    assert (delivery.state, delivery.reason) == (state, reason)
    assert delivery.items == tuple(i.id for i in items)
    assert delivery.ok == (state == DeliveryState.DELIVERED)


def test_the_order_key_is_the_one_the_processor_queues_events_under(
    tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = Gateway(write_config(tmp_path, pd_url=pd.url), capsys)
    gateway.ingest(desk_mail("Printer on fire"))
    [queued] = gateway.store.outbox(("done",))
    assert queued.order_key == order_key("helpdesk", "Printer on fire")


def test_gateway_incidents_shows_a_dead_lettered_trigger_as_not_delivered(
    tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = Gateway(write_config(tmp_path, pd_url=pd.url), capsys)
    pd.fail_next(1, 400)  # PagerDuty refuses the trigger: a dead letter
    gateway.ingest(desk_mail("Printer on fire"))
    gateway.ingest(desk_mail("Disk full"))
    code, out = gateway("incidents")
    assert code == 0
    header, *rows = [line for line in out.splitlines() if "helpdesk" in line or "PagerDuty" in line]
    assert "PagerDuty" in header
    [printer] = [r for r in rows if "Printer on fire" in r]
    [disk] = [r for r in rows if "Disk full" in r]
    assert "NOT DELIVERED: the trigger (#1) is a dead letter: HTTP 400" in printer
    assert "triggered" in printer  # the local state is unchanged
    assert "delivered" in disk and "NOT" not in disk


def test_gateway_incidents_in_local_mode_says_nothing_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = Gateway(write_config(tmp_path, routing_key=None), capsys)
    gateway.ingest(desk_mail("No account yet"))
    code, out = gateway("incidents")
    assert code == 0 and "NOT DELIVERED: local mode" in out


def test_gateway_check_says_plainly_when_paging_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = Gateway(write_config(tmp_path, routing_key=None), capsys)("check")
    assert code == 0
    assert (
        "NOTE: PagerDuty delivery is OFF for helpdesk: no routing_key (local mode), "
        "incidents are kept here and nothing is sent"
    ) in out.splitlines()
    paging = tmp_path / "paging"
    paging.mkdir()
    code, out = Gateway(write_config(paging, pd_url="http://x"), capsys)("check")
    assert code == 0 and "NOTE" not in out
