"""Reverse rules (`[[pagerduty_rule]]`): loaded with file:line errors, checked by `gateway
check`, testable offline with `gateway test-rules --pagerduty-event`, and picking the theme in a
running gateway (real HTTP webhook in, real SMTP sink out)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import cli
from gateway.errors import RuleError
from gateway.rules import evaluate_pagerduty, load_ruleset
from tests.conftest import ROOT, RULES_DIR, desk_mail, free_port, wait_until
from tests.pdserver import PagerDutyStandIn
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

REVERSE_RULES = """
[[pagerduty_rule]]
name = "urgent and acknowledged"
match = "all"
conditions = [
  { field = "urgency", op = "equals", value = "high" },
  { field = "status", op = "equals", value = "acknowledged" },
]
action = "notify"
theme = "urgent_ack"
to = ["oncall-desk@helpdesk.example"]

[[pagerduty_rule]]
name = "escalations stay in PagerDuty"
conditions = [ { field = "event_type", op = "equals", value = "incident.escalated" } ]
action = "discard"
"""


def rules_file(directory: Path, extra: str = REVERSE_RULES) -> Path:
    path = directory / "helpdesk.toml"
    path.write_text((RULES_DIR / "helpdesk.toml").read_text() + extra)
    return path


def templates_with_urgent_theme(directory: Path) -> Path:
    """The shipped themes plus `urgent_ack`: incident_update with its own subject."""
    templates = directory / "templates"
    shutil.copytree(ROOT / "templates", templates)
    urgent = templates / "urgent_ack"
    shutil.copytree(templates / "incident_update", urgent)
    text = (urgent / "message.txt.j2").read_text()
    (urgent / "message.txt.j2").write_text(
        text.replace("Subject: Re: ", "Subject: [URGENT, acknowledged] Re: ")
    )
    return templates


class TestLoading:
    def test_reverse_rules_load_in_order(self, tmp_path: Path) -> None:
        ruleset = load_ruleset([rules_file(tmp_path)])
        assert [r.name for r in ruleset.pagerduty_rules] == [
            "urgent and acknowledged",
            "escalations stay in PagerDuty",
        ]
        first = ruleset.pagerduty_rules[0]
        assert (first.action, first.theme, first.to) == (
            "notify",
            "urgent_ack",
            ("oncall-desk@helpdesk.example",),
        )
        assert first.where.endswith(f"helpdesk.toml:{first.line}") and first.line

    @pytest.mark.parametrize(
        ("rule", "message"),
        [
            ('conditions = [{ field = "sevrity", op = "equals", value = "x" }]\nto = ["a@b"]',
             "unknown field 'sevrity'"),
            ('conditions = [{ op = "always" }]\naction = "page"', "unknown action 'page'"),
            ('conditions = [{ op = "always" }]\naction = "notify"', 'needs to = ["address"'),
            ('conditions = [{ op = "always" }]\nto = ["a@b"]\ncolour = "red"', "unknown key"),
            ('conditions = [{ field = "note", op = "matches", value = "(" }]\naction = "mirror"',
             "bad regex"),
        ],
    )  # fmt: skip
    def test_a_bad_reverse_rule_is_named_by_file_and_line(
        self, tmp_path: Path, rule: str, message: str
    ) -> None:
        path = rules_file(tmp_path, f'\n\n[[pagerduty_rule]]\nname = "bad one"\n{rule}\n')
        header = path.read_text().splitlines().index("[[pagerduty_rule]]") + 1
        with pytest.raises(RuleError) as info:
            load_ruleset([path])
        (problem,) = info.value.problems
        assert message in problem.message
        assert problem.file.endswith("helpdesk.toml")
        assert problem.line is not None and problem.line >= header

    def test_the_first_matching_reverse_rule_decides(self, tmp_path: Path) -> None:
        ruleset = load_ruleset([rules_file(tmp_path)])
        fields = {"event_type": "incident.acknowledged", "status": "acknowledged"}
        urgent = evaluate_pagerduty(ruleset, {**fields, "urgency": "high"})
        low = evaluate_pagerduty(ruleset, {**fields, "urgency": "low"})
        escalated = evaluate_pagerduty(ruleset, {"event_type": "incident.escalated"})
        assert (urgent.rule, urgent.theme) == ("urgent and acknowledged", "urgent_ack")
        assert (low.rule, low.action) == (None, "mirror")
        assert escalated.action == "discard"


class TestCommands:
    def config(self, directory: Path, templates: Path | None, outgoing: bool = True) -> Path:
        rules = rules_file(directory)
        text = f"""
[gateway]
data_dir = "data"
rules_dir = "{directory.as_posix()}"
templates_dir = "{(templates or ROOT / "templates").as_posix()}"
[smtp]
listen = ["127.0.0.1:{free_port()}"]
[[service]]
name = "helpdesk"
addresses = ["desk@*"]
rules = ["{rules.name}"]
[web]
listen = ""
"""
        if outgoing:
            text += '[outgoing]\nhost = "127.0.0.1"\nport = 25\nfrom = "gw@gateway.test"\n'
        path = directory / "config.toml"
        path.write_text(text)
        return path

    def test_check_names_a_reverse_rules_missing_theme_by_file_and_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = self.config(tmp_path, None)
        assert cli.main(["--config", str(config), "check"]) == 1
        err = capsys.readouterr().err
        line = (tmp_path / "helpdesk.toml").read_text().splitlines().index("[[pagerduty_rule]]") + 1
        assert f"helpdesk.toml:{line}" in err and "no theme 'urgent_ack'" in err

    def test_check_accepts_reverse_rules_with_their_theme(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = self.config(tmp_path, templates_with_urgent_theme(tmp_path))
        assert cli.main(["--config", str(config), "check"]) == 0, capsys.readouterr().err

    def test_test_rules_shows_what_a_pagerduty_event_would_do(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = self.config(tmp_path, templates_with_urgent_theme(tmp_path))
        event = tmp_path / "event.json"
        event.write_bytes(event_body("incident.acknowledged", "VPN down", urgency="high"))
        argv = ["--config", str(config), "test-rules", "--pagerduty-event", str(event)]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "rule:     urgent and acknowledged" in out
        assert "mail:     theme urgent_ack to oncall-desk@helpdesk.example" in out
        event.write_bytes(event_body("incident.acknowledged", "VPN down", urgency="low"))
        assert cli.main([*argv, "--json"]) == 0
        decided = json.loads(capsys.readouterr().out)
        assert decided["rule"] is None and decided["action"] == "mirror"
        assert decided["fields"]["urgency"] == "low"

    def test_test_rules_refuses_a_body_that_is_no_webhook(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = self.config(tmp_path, None)
        event = tmp_path / "event.json"
        event.write_text('{"messages": []}')
        argv = ["--config", str(config), "test-rules", "--pagerduty-event", str(event)]
        assert cli.main(argv) == 1
        assert "Webhooks v3" in capsys.readouterr().err


@pytest.fixture
def reverse_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    for name, value in SECRETS_ENV.items():
        monkeypatch.setenv(name, value)
    pd, sink = PagerDutyStandIn().start(), Sink(free_port()).start()
    rules = tmp_path / "rules"
    rules.mkdir()
    rules_file(rules)
    templates = templates_with_urgent_theme(tmp_path)
    try:
        config, port, web_port = two_way_config(
            tmp_path, pd.url, sink.port, rules_dir=rules, templates_dir=templates
        )
        with serving(config, port, web_port) as gateway:
            store = store_of(tmp_path)
            try:
                yield gateway, pd, sink, store
            finally:
                store.close()
    finally:
        sink.stop()
        pd.stop()


def test_a_reverse_rule_on_urgency_and_status_picks_its_theme(reverse_rig: tuple) -> None:
    gateway, _pd, sink, store = reverse_rig
    for subject in ("Core switch down", "Printer low on toner"):
        send_mail(gateway, desk_mail(subject, "New"))
        wait_for_incident(store, subject, state="triggered")
    post(gateway, event_body("incident.acknowledged", "Core switch down", urgency="high"))
    post(gateway, event_body("incident.acknowledged", "Printer low on toner", urgency="low"))
    escalated = event_body("incident.escalated", "Core switch down", status="triggered")
    post(gateway, escalated)
    wait_until(lambda: len(sink.handler.messages()) >= 2, message=gateway.output())
    wait_until(lambda: store.pending_pagerduty_events() == [], message="events stay pending")
    by_subject = {str(m["Subject"]): m for m in sink.handler.messages()}
    assert len(sink.handler.messages()) == 2
    assert set(by_subject) == {
        "[URGENT, acknowledged] Re: Core switch down",  # the reverse rule's theme and address
        "Re: Printer low on toner",  # no rule matched: the `notify.on` shorthand
    }
    assert by_subject["[URGENT, acknowledged] Re: Core switch down"]["To"] == (
        "oncall-desk@helpdesk.example"
    )
    assert by_subject["Re: Printer low on toner"]["To"] == "support@helpdesk.example"
    outcomes = {e.event_type: e.outcome for e in store.pagerduty_events(
        incident_key="Core switch down")}  # fmt: skip
    assert outcomes == {"incident.acknowledged": "notified", "incident.escalated": "discarded"}
    assert os.environ["PD_WEBHOOK_NEW"]  # the secrets came from the environment
