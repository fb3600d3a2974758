"""REST actions of mail rules (set_priority, set_urgency, add_note, reassign, add_responders):
validated with file:line, queued in the durable outbox, and sent to a REST stand-in written from
PagerDuty's API reference with the right method, path, headers and body, retried on 429."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import RuleError
from gateway.rules import load_ruleset
from tests.conftest import desk_mail, free_port, wait_until
from tests.pdrest import RestStandIn
from tests.pdserver import PagerDutyStandIn, Scripted
from tests.test_mailer import Sink
from tests.webhook_support import (
    SECRETS_ENV,
    event_body,
    post,
    send_mail,
    serving,
    store_of,
    two_way_config,
    wait_for_incident,
)

TOKEN = "y_NbAkKc66ryYTWUXYEu"  # the REST API token's shape
API_FROM = "oncall-bot@yourcompany.example"
RULES = """
[[rule]]
name = "resolved case"
conditions = [ { field = "body", op = "contains", value = "Status: Resolved" } ]
action = "resolve"

[[rule]]
name = "escalated case"
conditions = [ { field = "body", op = "contains", value = "Status: Escalated" } ]
action = "acknowledge"
reassign = { escalation_policy = "PESC001" }
add_responders = { user = "PUSER01" }

[[rule]]
name = "new case"
conditions = [ { field = "body", op = "contains", value = "Status: New" } ]
action = "trigger"
set_priority = "P1"
set_urgency = "high"
add_note = "From the helpdesk: {{ subject }}"
"""


class TestRules:
    def test_rest_actions_are_compiled_in_order(self, tmp_path: Path) -> None:
        path = tmp_path / "rules.toml"
        path.write_text(RULES)
        new, escalated = load_ruleset([path]).rules[2], load_ruleset([path]).rules[1]
        assert new.rest == (
            ("set_priority", "P1"),
            ("set_urgency", "high"),
            ("add_note", "From the helpdesk: {{ subject }}"),
        )
        assert escalated.rest == (
            ("reassign", "escalation_policy:PESC001"),
            ("add_responders", "user:PUSER01"),
        )

    @pytest.mark.parametrize(
        ("lines", "message"),
        [
            ('action = "resolve"\nset_priority = "P1"', "set_priority needs action trigger"),
            ('action = "trigger"\nset_urgency = "urgent"', "set_urgency must be high or low"),
            ('action = "trigger"\nreassign = { team = "PT1" }', "reassign must be"),
            ('action = "trigger"\nadd_responders = { user = "bob" }', "PagerDuty id"),
            ('action = "discard"\nadd_note = "x"', "add_note needs action"),
            ('action = "trigger"\nadd_note = "{{ nope }}"', "unknown template variable"),
        ],
    )
    def test_a_bad_rest_action_is_named_by_file_and_line(
        self, tmp_path: Path, lines: str, message: str
    ) -> None:
        path = tmp_path / "rules.toml"
        path.write_text('[[rule]]\nname = "r"\nconditions = [{ op = "always" }]\n' + lines + "\n")
        with pytest.raises(RuleError) as info:
            load_ruleset([path])
        (problem,) = info.value.problems
        assert message in problem.message and problem.file.endswith("rules.toml")
        assert problem.line in (4, 5)


@pytest.fixture
def rest_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    for name, value in {**SECRETS_ENV, "PD_API_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    pd, sink, rest = PagerDutyStandIn().start(), Sink(free_port()).start(), RestStandIn(TOKEN)
    rest.start()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "helpdesk.toml").write_text(RULES)
    try:
        config, port, web_port = two_way_config(tmp_path, pd.url, sink.port, rules_dir=rules)
        config.write_text(config.read_text().replace("[pagerduty]\n", (
            f'[pagerduty]\napi_token = "${{PD_API_TOKEN}}"\napi_url = "{rest.url}"\n'
            f'api_from = "{API_FROM}"\napi_requester_id = "PREQ001"\n'
        ), 1))  # fmt: skip
        with serving(config, port, web_port) as gateway:
            store = store_of(tmp_path)
            try:
                yield gateway, rest, store
            finally:
                store.close()
    finally:
        rest.stop()
        sink.stop()
        pd.stop()


def test_rest_actions_reach_the_stand_in_and_retry_on_429(rest_rig: tuple) -> None:
    gateway, rest, store = rest_rig
    rest.add_incident("Core switch down", "PINC001")
    rest.script.append(Scripted(429, '{"error": {"message": "Rate Limit"}}', {"Retry-After": "0"}))
    send_mail(gateway, desk_mail("Core switch down", "New"))
    writes = wait_until(lambda: len(rest.writes("PINC001")) == 3 and rest.writes("PINC001"),
                        timeout=30, message=gateway.output())  # fmt: skip
    assert [(w["method"], w["path"]) for w in writes] == [
        ("PUT", "/incidents/PINC001"),
        ("PUT", "/incidents/PINC001"),
        ("POST", "/incidents/PINC001/notes"),
    ]
    priority = {"id": "PSO75BM", "type": "priority_reference"}  # "P1" by name -> its id
    assert [w["body"] for w in writes] == [
        {"incident": {"id": "PINC001", "type": "incident_reference", "priority": priority}},
        {"incident": {"id": "PINC001", "type": "incident_reference", "urgency": "high"}},
        {"note": {"content": "From the helpdesk: Core switch down"}},
    ]
    for write in writes:
        assert write["headers"]["authorization"] == f"Token token={TOKEN}"
        assert write["headers"]["from"] == API_FROM
        assert write["headers"]["accept"] == "application/vnd.pagerduty+json;version=2"
        assert write["headers"]["content-type"] == "application/json"
    assert rest.requests[0]["status"] == 429  # the first call was refused, and retried
    lookups = [r for r in rest.requests if r["path"] == "/incidents" and r["status"] == 200]
    assert lookups and lookups[0]["query"]["incident_key"] == ["Core switch down"]
    assert lookups[0]["query"]["statuses[]"] == ["triggered", "acknowledged"]
    assert "Token token" not in str(store.outbox(("done",), limit=100))  # no secret stored


def test_reassign_and_responders_use_the_incident_id_a_webhook_gave(rest_rig: tuple) -> None:
    gateway, rest, store = rest_rig
    rest.add_incident("Mail queue stuck", "PMQ0001")
    send_mail(gateway, desk_mail("Mail queue stuck", "New"))
    wait_until(lambda: len(rest.writes("PMQ0001")) == 3, timeout=30, message=gateway.output())
    post(gateway, event_body("incident.acknowledged", "Mail queue stuck", pd_id="PMQ0001"))
    wait_for_incident(store, "Mail queue stuck", pd_id="PMQ0001")
    lookups_before = _lookups(rest, "Mail queue stuck")
    send_mail(gateway, desk_mail("Mail queue stuck", "Escalated"))
    writes = wait_until(lambda: len(rest.writes("PMQ0001")) == 5 and rest.writes("PMQ0001"),
                        timeout=30, message=gateway.output())  # fmt: skip
    reassign, responders = writes[3:]
    assert (reassign["method"], reassign["path"]) == ("PUT", "/incidents/PMQ0001")
    assert reassign["body"]["incident"]["escalation_policy"] == {
        "id": "PESC001",
        "type": "escalation_policy_reference",
    }
    assert (responders["method"], responders["path"]) == (
        "POST",
        "/incidents/PMQ0001/responder_requests",
    )
    assert responders["body"]["requester_id"] == "PREQ001"
    assert responders["body"]["responder_request_targets"] == [
        {"responder_request_target": {"id": "PUSER01", "type": "user_reference"}}
    ]
    assert _lookups(rest, "Mail queue stuck") == lookups_before  # the mirror's id was used


def _lookups(rest: RestStandIn, key: str) -> int:
    return sum(
        1 for r in rest.requests
        if r["path"] == "/incidents" and r["query"].get("incident_key") == [key]
    )  # fmt: skip
