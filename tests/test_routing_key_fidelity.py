"""Routing-key fidelity: PagerDuty drops an acknowledge or resolve sent with another routing key
than the trigger's, so each incident keeps the key that opened it, even after a rotation."""

from __future__ import annotations

import json
import signal
import smtplib
from pathlib import Path

import pytest

from gateway.decide.incidents import apply_action
from gateway.store import open_store
from tests.cli_support import Cli
from tests.conftest import ROUTING_KEY, GatewayProcess, desk_mail, wait_until, write_config
from tests.pdserver import PagerDutyStandIn

ROTATED = "S" + ROUTING_KEY[1:]  # the service's new integration key, 32 characters too


def send(gateway: GatewayProcess, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail("support@helpdesk.example", ["desk@gateway.example"], raw)


def sent(pd: PagerDutyStandIn, key: str) -> list[tuple[str, str]]:
    return [(e["event_action"], e["routing_key"]) for e in pd.events if e["dedup_key"] == key]


def test_the_routing_key_that_opened_an_incident_is_used_after_rotation(
    gateway_process: GatewayProcess, pd: PagerDutyStandIn
) -> None:
    gateway = gateway_process.start()
    send(gateway, desk_mail("Payroll export failed", "New"))
    wait_until(lambda: sent(pd, "Payroll export failed"), message=gateway.output())
    config = gateway.config
    config.write_text(config.read_text().replace(ROUTING_KEY, ROTATED))
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: gateway.output().count("worker running generation") >= 2,
               message=gateway.output())  # fmt: skip
    send(gateway, desk_mail("Payroll export failed", "Resolved"))
    send(gateway, desk_mail("Backups late", "New"))  # opened after the rotation
    wait_until(lambda: len(sent(pd, "Payroll export failed")) == 2, message=gateway.output())
    wait_until(lambda: sent(pd, "Backups late"), message=gateway.output())
    assert sent(pd, "Payroll export failed") == [
        ("trigger", ROUTING_KEY),
        ("resolve", ROUTING_KEY),  # not ROTATED: PagerDuty would have dropped it
    ]
    assert sent(pd, "Backups late") == [("trigger", ROTATED)]
    assert gateway.stop() == 0


def test_an_incident_remembers_its_opening_key_only_when_it_opens() -> None:
    opened, _ = apply_action(None, service="s", key="k", action="trigger", now=1.0,
                             routing_key="A" * 32)  # fmt: skip
    assert opened is not None and opened.routing_key == "A" * 32
    again, _ = apply_action(opened, service="s", key="k", action="trigger", now=2.0,
                            routing_key="B" * 32)  # fmt: skip
    assert again is not None and again.routing_key == "A" * 32  # a duplicate keeps it
    resolved, _ = apply_action(again, service="s", key="k", action="resolve", now=3.0)
    assert resolved is not None and resolved.routing_key == "A" * 32
    reopened, _ = apply_action(resolved, service="s", key="k", action="trigger", now=4.0,
                               routing_key="B" * 32)  # fmt: skip
    assert reopened is not None and reopened.routing_key == "B" * 32  # a new PagerDuty incident


@pytest.fixture
def cli(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    return Cli(write_config(tmp_path, pd_url=pd.url), capsys, monkeypatch)


def rotate(cli: Cli) -> None:
    """The operator puts the service's new integration key in config.toml."""
    cli.config.write_text(cli.config.read_text().replace(ROUTING_KEY, ROTATED))


def pagerduty_back(pd: PagerDutyStandIn) -> None:
    with pd.lock:
        pd.script.clear()


def test_a_trigger_queued_before_a_rotation_goes_out_with_the_key_its_incident_records(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(100, 500)  # PagerDuty down: the trigger waits in the outbox
    cli.ingest(desk_mail("Payroll export failed", "New"))
    rotate(cli)
    listed = cli("outbox", "--json")
    assert ROUTING_KEY not in listed.out and ROTATED not in listed.out  # a secret, never shown
    (item,) = [json.loads(line) for line in listed.out.splitlines()]
    assert item["payload"]["routing_key"] == "(the key that opened the incident)"
    pagerduty_back(pd)
    assert cli("outbox", "flush", "--all").code == 0  # sent after the rotation
    cli.ingest(desk_mail("Payroll export failed", "Resolved"))
    incident = open_store(cli.db).incident("helpdesk", "Payroll export failed")
    assert incident is not None and incident.routing_key == ROUTING_KEY
    assert sent(pd, "Payroll export failed") == [
        ("trigger", ROUTING_KEY),  # not ROTATED: its resolve would have been dropped
        ("resolve", ROUTING_KEY),
    ]
    cli.ingest(desk_mail("Backups late", "New"))  # opened after the rotation
    assert sent(pd, "Backups late") == [("trigger", ROTATED)]


def test_a_resolve_sent_by_hand_after_a_rotation_uses_the_key_that_opened_the_incident(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    cli.ingest(desk_mail("Payroll export failed", "New"))
    rotate(cli)
    done = cli("incidents", "resolve", "helpdesk", "Payroll export failed", "--send")
    assert done.code == 0 and "resolve event sent to PagerDuty" in done.out, done
    assert sent(pd, "Payroll export failed") == [("trigger", ROUTING_KEY), ("resolve", ROUTING_KEY)]
