"""`time` conditions and the `within` template name: rules that depend on when mail arrived.

The seed's example, in one rule: an urgent case outside business hours pages (critical), inside
them it only gets severity warning. Instants are fixed; the processor judges the moment the mail
was accepted, not the moment it happens to be decided.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.cli import main
from gateway.config import PagerDutySettings, ServiceSettings, load_config
from gateway.decide.processor import Processor, load_services
from gateway.errors import RuleError
from gateway.intake.spool import incoming
from gateway.mail.parse import parse_message
from gateway.outcomes import Outcome
from gateway.rules import evaluate, load_ruleset
from gateway.store import open_store
from tests.conftest import desk_mail, write_config

BERLIN = ZoneInfo("Europe/Berlin")
SCHEDULES = """
[schedules.business_hours]
timezone = "Europe/Berlin"
weekdays = ["09:00-17:00"]
holidays = [2026-12-25]
"""
URGENT = """
[[rule]]
name = "urgent case"
conditions = [{ field = "body", op = "contains", value = "Priority: Urgent" }]
action = "trigger"
severity = "{{ 'warning' if within.business_hours else 'critical' }}"
summary = "{{ subject }}"
"""
URGENT_OUT_OF_HOURS_ONLY = """
[[rule]]
name = "urgent out of hours"
conditions = [
  { field = "body", op = "contains", value = "Priority: Urgent" },
  { field = "time", op = "outside", value = "business_hours" },
]
action = "trigger"

[[rule]]
name = "urgent in hours"
conditions = [{ field = "body", op = "contains", value = "Priority: Urgent" }]
action = "discard"
"""


def berlin(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


def urgent_mail(subject: str = "Checkout is down") -> bytes:
    return desk_mail(subject, extra="Priority: Urgent\n")


def setup(tmp_path: Path, rules: str) -> tuple[Path, Path]:
    rule_file = tmp_path / "time.toml"
    rule_file.write_text(rules)
    config = write_config(tmp_path, routing_key=None, extra=SCHEDULES)
    config.write_text(config.read_text().replace('"helpdesk.toml"', f'"{rule_file}"'))
    return config, rule_file


def decide(tmp_path: Path, rules: str, at: float):
    config, rule_file = setup(tmp_path, rules)
    schedules = load_config(config).schedules
    ruleset = load_ruleset([rule_file], schedules=schedules)
    return evaluate(ruleset, parse_message(urgent_mail()), at=at)


@pytest.mark.parametrize(
    ("when", "severity"),
    [
        pytest.param("2026-12-23T10:00", "warning", id="wednesday-in-hours"),
        pytest.param("2026-12-23T18:30", "critical", id="wednesday-evening"),
        pytest.param("2026-12-25T10:00", "critical", id="christmas-holiday"),
        pytest.param("2026-12-26T10:00", "critical", id="saturday"),
        pytest.param("2026-03-30T09:00", "warning", id="monday-after-dst-change"),
    ],
)
def test_urgent_case_pages_outside_business_hours_and_is_a_warning_inside(
    tmp_path: Path, when: str, severity: str
) -> None:
    decision = decide(tmp_path, URGENT, berlin(when))
    assert decision.rule == "urgent case" and decision.action == "trigger"
    assert decision.severity == severity


def test_time_condition_lets_an_in_hours_urgent_case_be_discarded(tmp_path: Path) -> None:
    night = decide(tmp_path, URGENT_OUT_OF_HOURS_ONLY, berlin("2026-12-23T23:00"))
    assert (night.rule, night.action) == ("urgent out of hours", "trigger")
    day = decide(tmp_path, URGENT_OUT_OF_HOURS_ONLY, berlin("2026-12-23T11:00"))
    assert (day.rule, day.action) == ("urgent in hours", "discard")
    assert day.trace[0].reason == 'condition 2 time outside "business_hours": no'


def test_processor_judges_the_time_the_mail_was_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted at night, decided (after a backlog) during the day: it still pages critical."""
    config, rule_file = setup(tmp_path, URGENT)
    settings = load_config(config)
    store = open_store(tmp_path / "gateway.sqlite3")

    class AcceptedAt:
        @staticmethod
        def time() -> float:
            return berlin("2026-12-23T03:00")

    import gateway.store.sqlite.spool as spool_module

    monkeypatch.setattr(spool_module, "time", AcceptedAt)
    store.accept([incoming(urgent_mail(), source="cli", services=("helpdesk",))])
    monkeypatch.undo()
    service = ServiceSettings("helpdesk", ("desk@*",), (rule_file,))
    services = load_services((service,), schedules=settings.schedules)
    processor = Processor(
        store, services, PagerDutySettings(), clock=lambda: berlin("2026-12-23T11:00")
    )
    (done,) = processor.process_pending()
    assert done.outcome == Outcome.TRIGGERED
    assert done.event is not None and done.event["payload"]["severity"] == "critical"


def test_test_rules_takes_the_instant_to_judge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup(tmp_path, URGENT)
    mail = tmp_path / "urgent.eml"
    mail.write_bytes(urgent_mail())
    for when, severity in (
        ("2026-12-23T10:00+01:00", "warning"),
        ("2026-12-23T23:00Z", "critical"),
    ):
        assert main(["--config", str(config), "test-rules", str(mail), "--at", when]) == 0
        assert f"severity: {severity}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("condition", "words"),
    [
        pytest.param(
            '{ field = "time", op = "outside", value = "business-hours" }',
            "unknown schedule 'business-hours' (defined: business_hours)",
            id="unknown-schedule",
        ),
        pytest.param(
            '{ field = "time", op = "contains", value = "business_hours" }',
            "field time takes op within or outside",
            id="bad-op",
        ),
    ],
)
def test_check_names_file_and_line_of_a_bad_time_condition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], condition: str, words: str
) -> None:
    rules = f'[[rule]]\nname = "x"\nconditions = [\n  {condition},\n]\naction = "trigger"\n'
    config, rule_file = setup(tmp_path, rules)
    assert main(["--config", str(config), "check"]) == 1
    out = capsys.readouterr()
    assert f"{rule_file}:4:" in out.out + out.err and words in out.out + out.err


def test_check_refuses_a_template_reading_an_unknown_schedule(tmp_path: Path) -> None:
    config, rule_file = setup(tmp_path, URGENT.replace("within.business_hours", "within.office"))
    with pytest.raises(RuleError) as caught:
        load_ruleset([rule_file], schedules=load_config(config).schedules)
    assert f"{rule_file}:2:" in str(caught.value) or f"{rule_file}:6:" in str(caught.value)
    assert "unknown schedule(s) office" in str(caught.value)


def test_check_names_file_and_line_of_a_bad_schedule_in_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup(tmp_path, URGENT)
    text = config.read_text().replace('"Europe/Berlin"', '"Europe/Berlim"')
    config.write_text(text)
    line = text.splitlines().index('timezone = "Europe/Berlim"') + 1
    assert main(["--config", str(config), "check"]) == 1
    out = capsys.readouterr()
    assert f"{config}:{line}:" in out.out + out.err
    assert "unknown time zone 'Europe/Berlim'" in out.out + out.err


def test_the_word_within_in_template_text_is_not_a_schedule(tmp_path: Path) -> None:
    rules = URGENT.replace('summary = "{{ subject }}"', 'summary = "{{ subject }} (within.reach)"')
    config, rule_file = setup(tmp_path, rules)
    ruleset = load_ruleset([rule_file], schedules=load_config(config).schedules)
    decision = evaluate(ruleset, parse_message(urgent_mail()), at=berlin("2026-12-23T10:00"))
    assert decision.summary == "Checkout is down (within.reach)"
    assert decision.severity == "warning"
