"""Operators see the webhook side (issue 14's loose ends): `/metrics` counts PagerDuty's
deliveries received and decided by outcome, and the pending ones; `/healthz` fails when one
waits too long for its decision; `gateway webhooks` lists them, read-only."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import WebSettings, load_config
from gateway.store import Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.pagerduty_webhook import PagerDutyWebhook, sign
from gateway.web.status import WebApp
from tests.cli_support import Cli, run_gateway
from tests.conftest import wait_until, write_config
from tests.net import free_port
from tests.ops_support import metric as labeled_metric
from tests.pdserver import PagerDutyStandIn
from tests.test_mailer import Sink
from tests.web_support import SMTP_UP, call, service
from tests.webhook_support import SECRETS_ENV, event_body, post, serving, two_way_config

SMTP = SimpleNamespace(**vars(SMTP_UP), refusal_counts={})  # what /metrics reads of it too

SECRET = "subscription-secret-0123456789"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "gateway.sqlite3"


@pytest.fixture
def seed(db: Path) -> Iterator[Store]:
    """The test's own connection: what the worker would have decided, written directly."""
    db.parent.mkdir(exist_ok=True)
    store = open_store(db)
    yield store
    store.close()


@pytest.fixture
def web(db: Path, seed: Store) -> Iterator[WebApp]:
    thread = StoreThread(db, "web-test")
    app = WebApp(thread, WebSettings(), live=LiveState(smtp=SMTP))
    app.services = [service()]
    app.pagerduty = PagerDutyWebhook(thread, (SECRET,))
    yield app
    thread.close()


def deliver(web: WebApp, body: bytes, webhook_id: str) -> int:
    headers = {"X-PagerDuty-Signature": sign(body, SECRET), "X-Webhook-Id": webhook_id}
    return call(web, "POST", "/pagerduty/webhook", content=body, headers=headers).status_code


def stored_long_ago(seed: Store, seconds: float, webhook_id: str = "old") -> int:
    """A delivery stored `seconds` ago and never decided (the worker is stuck)."""
    body = event_body("incident.acknowledged", "Printer on fire").decode()
    stored = seed.add_pagerduty_event(
        body=body,
        received_at=time.time() - seconds,
        webhook_id=webhook_id,
        event_type="incident.acknowledged",
        incident_key="Printer on fire",
    )
    assert stored is not None
    return stored


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value; every sample also carries the answering node's label (issue 13)."""
    value = labeled_metric(text, name, **labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


def test_metrics_count_webhook_deliveries_by_outcome_and_the_pending_ones(
    web: WebApp, seed: Store
) -> None:
    assert deliver(web, event_body("incident.acknowledged", "VPN down"), "w1") == 202
    assert deliver(web, event_body("incident.resolved", "VPN down"), "w2") == 202
    assert deliver(web, event_body("incident.resolved", "VPN down"), "w2") == 200  # redelivery
    assert deliver(web, event_body("incident.acknowledged", "Never sent"), "w3") == 202
    first, second, unknown = sorted(e.id for e in seed.pending_pagerduty_events())
    seed.finish_pagerduty_event(first, outcome="mirrored", service="helpdesk")
    seed.finish_pagerduty_event(unknown, outcome="unknown_key")
    stored_long_ago(seed, 120.0)
    text = call(web, "GET", "/metrics").text
    assert metric(text, "gateway_webhooks_received_total") == 4  # the redelivery counts once
    assert metric(text, "gateway_webhooks_decided_total", outcome="mirrored") == 1
    assert metric(text, "gateway_webhooks_decided_total", outcome="unknown_key") == 1
    assert metric(text, "gateway_webhooks_pending") == 2  # `second` and the old one
    assert metric(text, "gateway_webhooks_oldest_pending_age_seconds") >= 120
    seed.finish_pagerduty_event(second, outcome="notified", service="helpdesk")
    text = call(web, "GET", "/metrics").text
    assert metric(text, "gateway_webhooks_pending") == 1


def test_metrics_show_no_pending_webhooks_as_zeros(web: WebApp) -> None:
    text = call(web, "GET", "/metrics").text
    assert metric(text, "gateway_webhooks_received_total") == 0
    assert metric(text, "gateway_webhooks_pending") == 0
    assert metric(text, "gateway_webhooks_oldest_pending_age_seconds") == 0


def health(web: WebApp) -> tuple[int, dict]:
    response = call(web, "GET", "/healthz")
    return response.status_code, response.json()


def test_healthz_fails_when_a_webhook_waits_too_long_for_its_decision(
    web: WebApp, seed: Store
) -> None:
    status, body = health(web)
    assert status == 200 and body["webhooks"]["ok"] is True, body
    assert body["webhooks"]["detail"]["pending"] == 0
    stored_long_ago(seed, 60.0, "recent")
    status, body = health(web)
    assert status == 200 and body["webhooks"]["detail"]["pending"] == 1  # within the limit
    old = stored_long_ago(seed, 600.0)  # the limit is webhook_max_age_seconds = 300
    status, body = health(web)
    assert status == 503 and body["webhooks"]["ok"] is False, body
    [reason] = body["reasons"]
    assert reason.startswith("2 PagerDuty webhook(s) waiting for their decision, the oldest for")
    assert "(limit 5.0m)" in reason and "the worker is not deciding them" in reason
    assert reason in call(web, "GET", "/").text  # red on the page, in the same words
    seed.finish_pagerduty_event(old, outcome="mirrored")
    assert health(web)[0] == 200


def test_the_webhook_limit_is_configurable(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='[web]\nlisten = ""\nwebhook_max_age_seconds = 60\n')
    assert load_config(config).web.webhook_max_age_seconds == 60


# -- gateway webhooks ----------------------------------------------------------------------------


@pytest.fixture
def cli(
    tmp_path: Path, seed: Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    return Cli(write_config(tmp_path), capsys, monkeypatch)


def three_deliveries(seed: Store) -> tuple[int, int, int]:
    ids = [stored_long_ago(seed, 300.0 - n, f"w{n}") for n in range(3)]
    seed.finish_pagerduty_event(ids[0], outcome="mirrored", service="helpdesk")
    seed.finish_pagerduty_event(ids[1], outcome="unknown_key", detail="a key never sent")
    return ids[0], ids[1], ids[2]


def test_gateway_webhooks_lists_deliveries_newest_first_with_their_outcome(
    cli: Cli, seed: Store
) -> None:
    mirrored, unknown, pending = three_deliveries(seed)
    result = cli("webhooks")
    assert result.code == 0, result
    lines = result.out.splitlines()
    rows = [line for line in lines if line.split() and line.split()[0].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [pending, unknown, mirrored]
    assert "pending" in rows[0] and "unknown_key" in rows[1] and "a key never sent" in rows[1]
    assert lines[-1] == "showing 3 of 3 webhook deliveries"
    limited = cli("webhooks", "--limit", "1").out
    assert limited.rstrip().endswith(
        "showing 1 of 3 webhook deliveries (--limit N or --all for more)"
    )


def test_gateway_webhooks_json_and_outcome_filter(cli: Cli, seed: Store) -> None:
    _, unknown, pending = three_deliveries(seed)
    [row] = [
        json.loads(x)
        for x in cli("webhooks", "--json", "--outcome", "unknown_key").out.splitlines()
    ]
    assert row["id"] == unknown and row["outcome"] == "unknown_key" and row["state"] == "done"
    assert set(row) == {
        "id", "received_at", "webhook_id", "event_id", "event_type", "key", "pd_incident",
        "service", "state", "outcome", "detail",
    }  # fmt: skip
    assert row["received_at"].endswith("Z") and row["key"] == "Printer on fire"
    [waiting] = [
        json.loads(x) for x in cli("webhooks", "--json", "--outcome", "pending").out.splitlines()
    ]
    assert waiting["id"] == pending and waiting["outcome"] is None
    assert cli("webhooks", "--outcome", "notified").out.strip() == "no webhook deliveries"


def test_gateway_webhooks_refuses_an_unknown_outcome_naming_the_known_ones(cli: Cli) -> None:
    result = cli("webhooks", "--outcome", "unknown-key")
    assert result.code == 1 and "did you mean 'unknown_key'?" in result.err
    assert "Traceback" not in result.err


def test_gateway_webhooks_escapes_terminal_sequences_from_pagerduty(cli: Cli, seed: Store) -> None:
    seed.add_pagerduty_event(
        body="{}",
        received_at=time.time(),
        webhook_id="evil",
        event_type="incident.acknowledged\x1b]0;owned\x07",
        incident_key="Disk \x1b[2Jfull",
    )
    for args in (("webhooks",), ("webhooks", "--json")):
        out = cli(*args).out
        assert "\x1b" not in out and "\x07" not in out, args


def test_a_running_gateway_shows_its_webhooks_in_metrics_health_and_the_listing(
    tmp_path: Path, pd: PagerDutyStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS_ENV.items():
        monkeypatch.setenv(name, value)
    sink = Sink(free_port()).start()
    try:
        config, port, web_port = two_way_config(tmp_path, pd.url, sink.port)
        with serving(config, port, web_port) as gateway:
            assert post(gateway, event_body("incident.acknowledged", "Never sent"))[0] == 202
            status, body = gateway.health()
            assert status == 200 and "webhooks" in body, body
            wait_until(
                lambda: "unknown_key" in gateway.get("/metrics")[1], message=gateway.output()
            )
            text = gateway.get("/metrics")[1]
            assert metric(text, "gateway_webhooks_received_total") == 1
            assert metric(text, "gateway_webhooks_decided_total", outcome="unknown_key") == 1
            assert metric(text, "gateway_webhooks_pending") == 0
            with monkeypatch.context() as shell:  # an on-call engineer's: no secrets
                for name in SECRETS_ENV:
                    shell.delenv(name)
                listed = run_gateway("--config", str(config), "webhooks", "--json")
            assert listed.returncode == 0, listed.stderr
            [row] = [json.loads(line) for line in listed.stdout.splitlines()]
            assert (row["event_type"], row["key"], row["outcome"]) == (
                "incident.acknowledged",
                "Never sent",
                "unknown_key",
            )
            assert gateway.stop() == 0
    finally:
        sink.stop()
