"""Routing-key fidelity: PagerDuty drops an acknowledge or resolve sent with another routing key
than the trigger's, so each incident keeps the key that opened it, even after a rotation."""

from __future__ import annotations

import signal
import smtplib

from gateway.decide.incidents import apply_action
from tests.conftest import ROUTING_KEY, GatewayProcess, desk_mail, wait_until
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
