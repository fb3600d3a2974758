"""`gateway import pagerduty|opsgenie` (issue 15 item 6): a vendor's email integration becomes one
rule file that passes `gateway check` and decides sample mails as the vendor documents.

The fixtures in tests/fixtures/import/ follow the vendors' published REST API schemas and
examples (PagerDuty `GET /services/{id}/integrations/{id}` of a generic email integration,
Opsgenie `GET /v2/integrations/{id}/actions`).
"""

from __future__ import annotations

import json
import tomllib
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.cli_support import Cli
from tests.conftest import ROOT, write_config

FIXTURES = ROOT / "tests" / "fixtures" / "import"


def mail(subject: str, body: str, sender: str = "Nagios <nagios@monitoring.example>") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "monitoring@subdomain.pagerduty.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{abs(hash((subject, body, sender)))}@monitoring.example>"
    msg.set_content(body)
    return msg.as_bytes()


class Migrated:
    """A config whose second service lists the imported file, and the CLI to drive it."""

    def __init__(self, tmp_path: Path, capsys, monkeypatch) -> None:
        self.rules = tmp_path / "imported.toml"
        service = (
            f'\n[[service]]\nname = "migrated"\naddresses = ["alerts@*"]\n'
            f'rules = ["{self.rules.as_posix()}"]\n'
        )
        self.cli = Cli(write_config(tmp_path, extra=service), capsys, monkeypatch)
        self.tmp = tmp_path

    def import_(self, vendor: str, fixture: str) -> list[str]:
        """Runs the import with -o; returns its warning lines."""
        result = self.cli("import", vendor, str(FIXTURES / fixture), "-o", str(self.rules))
        assert result.code == 0, result.err
        checked = self.cli("check")
        assert checked.code == 0, checked.err
        assert "OK:" in checked.out
        return [line for line in result.err.splitlines() if line.startswith("warning:")]

    def decision(self, raw: bytes) -> dict:
        path = self.tmp / "sample.eml"
        path.write_bytes(raw)
        result = self.cli("test-rules", "--service", "migrated", "--json", str(path))
        assert result.code == 0, result.err
        return json.loads(result.out)

    def decide(self, raw: bytes) -> tuple[str, str | None]:
        decision = self.decision(raw)
        return decision["action"], decision["incident_key"]


@pytest.fixture
def migrated(tmp_path: Path, capsys, monkeypatch) -> Migrated:
    return Migrated(tmp_path, capsys, monkeypatch)


# -- PagerDuty ------------------------------------------------------------------------------------


def test_pagerduty_rules_round_trip_behaves_as_pagerduty_documents(migrated: Migrated) -> None:
    """use_rules: parsers in order (nested all/any/not), incident_key by 'between', and the
    open_new_incident fallback: one incident per unmatched mail."""
    assert migrated.import_("pagerduty", "pagerduty_rules.json") == []
    problem = "State: CRITICAL\nHost: web-01\n"
    assert migrated.decide(mail("PROBLEM [web-01/disk] disk full", problem)) == (
        "trigger",
        "web-01/disk",
    )
    # the any() branch: not CRITICAL in the body, but from the Nagios address
    assert migrated.decide(mail("PROBLEM [web-02/load] high", "State: WARNING")) == (
        "trigger",
        "web-02/load",
    )
    assert migrated.decide(mail("RECOVERY [web-01/disk] disk ok", "State: OK")) == (
        "resolve",
        "web-01/disk",
    )
    # not(body contains 'scheduled downtime'): falls through to the fallback, its own incident
    quiet = mail("PROBLEM [web-03/disk] full", "State: CRITICAL\nscheduled downtime")
    action, key = migrated.decide(quiet)
    assert action == "trigger" and key is not None and "monitoring.example" in key
    other = mail("PROBLEM [web-04/x] y", "State: WARNING", sender="someone@else.example")
    assert migrated.decide(other)[1] != "web-04/x"  # fallback: keyed by Message-ID


def test_pagerduty_creation_modes_without_rules(migrated: Migrated, tmp_path: Path) -> None:
    """on_new_email: every mail its own incident; on_new_email_subject: one per subject."""
    for creation, same_subject_same_key in (
        ("on_new_email", False),
        ("on_new_email_subject", True),
    ):
        source = tmp_path / f"{creation}.json"
        source.write_text(
            json.dumps(
                {
                    "integration": {
                        "type": "generic_email_inbound_integration",
                        "name": "Email",
                        "email_incident_creation": creation,
                        "email_filter_mode": "all-email",
                    }
                }
            )
        )
        result = migrated.cli("import", "pagerduty", str(source), "-o", str(migrated.rules))
        assert result.code == 0, result.err
        assert migrated.cli("check").code == 0
        first = migrated.decide(mail("Disk full", "one"))
        second = migrated.decide(mail("Disk full", "two"))
        assert first[0] == second[0] == "trigger"
        assert (first[1] == second[1]) is same_subject_same_key


def test_pagerduty_filters_round_trip(migrated: Migrated) -> None:
    """and-rules-email: a mail must pass every filter (subject, from, and no [TEST]) to reach
    the parsers; fallback discard."""
    assert migrated.import_("pagerduty", "pagerduty_filters.json") == []
    sender = "Monitor <alerts@foo.test>"
    assert migrated.decide(mail("CRITICAL on host db-1", "x", sender)) == ("trigger", "db-1")
    assert migrated.decide(mail("RESOLVED on host db-1", "x", sender)) == ("resolve", "db-1")
    assert migrated.decide(mail("CRITICAL on host db-1", "x", "a@bar.test"))[0] == "discard"
    assert migrated.decide(mail("[TEST] CRITICAL on host db-1", "x", sender))[0] == "discard"


def test_pagerduty_filters_are_written_as_a_filter_table(capsys, monkeypatch, tmp_path) -> None:
    """The emitted [filter] table, as written to stdout."""
    cli = Cli(write_config(tmp_path), capsys, monkeypatch)
    result = cli("import", "pagerduty", str(FIXTURES / "pagerduty_filters.json"))
    assert result.code == 0, result.err
    written = tomllib.loads(result.out)  # stdout without -o
    assert written["filter"] == {
        "mode": "all",
        "conditions": [
            {"field": "subject", "op": "matches", "value": "(CRITICAL|RESOLVED)"},
            {"field": "from", "op": "matches", "value": r"(@foo\.test)"},
            {"field": "subject", "op": "not_matches", "value": r"\[TEST\]"},
        ],
    }
    assert written["unmatched"] == {"action": "discard"}
    assert [r["action"] for r in written["rule"]] == ["resolve", "trigger"]


def test_pagerduty_unrepresentable_parts_are_warnings_with_their_location(
    migrated: Migrated,
) -> None:
    warnings = migrated.import_("pagerduty", "pagerduty_unrepresentable.json")
    located = [line.split(": ", 3)[2] for line in warnings]
    assert located == [
        "email_filters[1].from_email_regex",
        "email_filters",
        "email_parsers[0].match_predicate.children[0]",
        "email_parsers[1].match_predicate.children[0].matcher",
        "email_parsers[2].action",
        "email_parsers[3].value_extractors",
    ]
    written = tomllib.loads(migrated.rules.read_text())
    assert "filter" not in written  # or-of-ands: not one [filter]; said, not guessed
    assert [(r["name"], r.get("enabled", True)) for r in written["rule"]] == [
        ("parser 1: trigger", False),
        ("parser 2: trigger", False),
        ("parser 4: resolve", True),
    ]
    # the disabled rules never act
    assert migrated.decide(mail("ALERT prod down", "prod"))[0] == "discard"


def test_import_refuses_what_is_not_an_integration(migrated: Migrated, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for text, vendor in (
        ("{not json", "pagerduty"),
        ('{"data": []}', "opsgenie"),
        ("[1]", "pagerduty"),
    ):
        bad.write_text(text)
        result = migrated.cli("import", vendor, str(bad))
        assert result.code == 1
        assert result.err.startswith("error: ") and "Traceback" not in result.err
        assert result.out == ""


# -- Opsgenie --------------------------------------------------------------------------------------


def test_opsgenie_actions_round_trip_behaves_as_opsgenie_documents(migrated: Migrated) -> None:
    """First matching action wins: ignore, then create / close / acknowledge by their filters,
    each keyed by the alias template; a mail no action matches does nothing."""
    warnings = migrated.import_("opsgenie", "opsgenie_actions.json")
    assert len(warnings) == 1 and "addNote[0]" in warnings[0]
    nagios = "Nagios <nagios@nagios.example>"
    assert migrated.decide(mail("PROBLEM: web-01 disk", "full", nagios)) == (
        "trigger",
        "web-01 disk",
    )
    assert migrated.decide(mail("ACKNOWLEDGEMENT: web-01 disk", "on it", nagios)) == (
        "acknowledge",
        "web-01 disk",
    )
    assert migrated.decide(mail("RECOVERY: web-01 disk", "ok", nagios)) == (
        "resolve",
        "web-01 disk",
    )
    assert migrated.decide(mail("PROBLEM: web-01 disk [TEST]", "x", nagios))[0] == "discard"
    assert migrated.decide(mail("PROBLEM: web-01 disk", "x", "a@other.example"))[0] == "discard"
    assert migrated.decide(mail("NOTE: web-01 disk", "a note", nagios))[0] == "discard"
    written = tomllib.loads(migrated.rules.read_text())
    create = written["rule"][1]
    assert create["severity"] == "error"  # P2
    assert create["details"]["tags"] == "nagios, email"


def test_opsgenie_unrepresentable_parts_are_warnings_with_their_location(
    migrated: Migrated,
) -> None:
    warnings = migrated.import_("opsgenie", "opsgenie_unrepresentable.json")
    located = [line.split(": ", 3)[2] for line in warnings]
    assert located == [
        "create[0].filter.conditions[0]",
        "create[0].alias",
        "create[0].message",
        "create[0].priority",
        "create[0].responders",
        "close[0].alias",
    ]
    written = tomllib.loads(migrated.rules.read_text())
    assert [r.get("enabled", True) for r in written["rule"]] == [False, False]
    assert migrated.decide(mail("anything", "x"))[0] == "discard"


def test_opsgenie_templates_and_operations(migrated: Migrated, tmp_path: Path) -> None:
    """extract(/re/), substringBetween, is-empty, matches (whole value), not, and templates
    with literal braces stay what they were."""
    source = tmp_path / "ops.json"
    condition = {"field": "message", "operation": "matches", "expectedValue": "Status: (New|Open)"}
    source.write_text(
        json.dumps(
            {
                "data": {
                    "create": [
                        {
                            "name": "by ticket",
                            "order": 1,
                            "filter": {
                                "conditionMatchType": "match-all-conditions",
                                "conditions": [
                                    {**condition, "expectedValue": "(?s).*Status: (New|Open).*"},
                                    {"field": "subject", "operation": "is-empty", "not": True},
                                ],
                            },
                            "alias": "{{subject.extract(/#(\\d+)/)}}",
                            "message": "Ticket {{subject}} {% raw %}",
                        }
                    ],
                    "close": [
                        {
                            "name": "solved",
                            "order": 1,
                            "filter": {
                                "conditionMatchType": "match-any-condition",
                                "conditions": [
                                    {
                                        "field": "message",
                                        "operation": "contains",
                                        "expectedValue": "Solved",
                                    }
                                ],
                            },
                            "alias": '{{message.substringBetween("Ticket #", " ")}}',
                        }
                    ],
                }
            }
        )
    )
    result = migrated.cli("import", "opsgenie", str(source), "-o", str(migrated.rules))
    assert result.code == 0 and "warning:" not in result.err, result.err
    assert migrated.cli("check").code == 0
    assert migrated.decide(mail("Printer #42", "Status: Open\n")) == ("trigger", "42")
    assert migrated.decide(mail("Printer #42", "Ticket #42 is Solved\n")) == ("resolve", "42")
    assert migrated.decide(mail("", "Status: Open\n"))[0] == "discard"  # is-empty, negated
    assert migrated.decision(mail("Printer #42", "Status: New"))["summary"] == (
        "Ticket Printer #42 {% raw %}"
    )


def test_hostile_pagerduty_json_gets_warnings_not_a_hang_or_traceback(
    migrated: Migrated, tmp_path: Path
) -> None:
    """A predicate nested 400 deep, one that would expand to 2**40 rules, and JSON nested
    past the parser's limit: each is a warning (or one error line), quickly."""
    deep: dict = {"type": "contains", "matcher": "x", "part": "subject"}
    for _ in range(400):
        deep = {"type": "not", "children": [deep]}
    pair = {
        "type": "any",
        "children": [
            {"type": "contains", "matcher": "a", "part": "subject"},
            {"type": "contains", "matcher": "b", "part": "body"},
        ],
    }
    wide = {"type": "all", "children": [pair] * 40}
    parsers = [
        {"action": "trigger", "match_predicate": predicate, "value_extractors": []}
        for predicate in (deep, wide)
    ]
    source = tmp_path / "hostile.json"
    source.write_text(
        json.dumps(
            {"integration": {"email_incident_creation": "use_rules", "email_parsers": parsers}}
        )
    )
    result = migrated.cli("import", "pagerduty", str(source))
    assert result.code == 0, result.err
    assert "nested deeper than 20 levels" in result.err
    assert "expands to 1099511627776 alternatives" in result.err
    source.write_text("[" * 100_000 + "]" * 100_000)
    result = migrated.cli("import", "pagerduty", str(source))
    assert result.code == 1 and "nested too deeply" in result.err and "Traceback" not in result.err


def test_pagerduty_one_incident_at_a_time(migrated: Migrated, tmp_path: Path) -> None:
    source = tmp_path / "single.json"
    source.write_text(
        json.dumps(
            {
                "integration": {
                    "type": "generic_email_inbound_integration",
                    "integration_email": "monitoring@subdomain.pagerduty.com",
                    "email_incident_creation": "only_if_no_open_incidents",
                }
            }
        )
    )
    result = migrated.cli("import", "pagerduty", str(source), "-o", str(migrated.rules))
    assert result.code == 0 and "Bcc" in result.err
    assert migrated.cli("check").code == 0
    first = migrated.decide(mail("Disk full", "one"))
    second = migrated.decide(mail("CPU hot", "two"))
    assert first == second == ("trigger", "monitoring@subdomain.pagerduty.com")


@pytest.mark.parametrize(
    ("mode", "filters", "expected"),
    [
        (
            "or-rules-email",
            [
                {"subject_mode": "match", "subject_regex": "CRIT"},
                {"from_email_mode": "no-match", "from_email_regex": "noreply"},
            ],
            (
                "any",
                [
                    {"field": "subject", "op": "matches", "value": "CRIT"},
                    {"field": "from", "op": "not_matches", "value": "noreply"},
                ],
            ),
        ),
        (  # one filter that tests nothing accepts every mail
            "or-rules-email",
            [{"subject_mode": "match", "subject_regex": "CRIT"}, {"subject_mode": "always"}],
            (None, []),
        ),
        ("and-rules-email", [{"subject_mode": "always", "body_mode": "always"}], (None, [])),
        ("all-email", [{"subject_mode": "match", "subject_regex": "CRIT"}], (None, [])),
    ],
)
def test_pagerduty_filter_modes(mode: str, filters: list, expected: tuple) -> None:
    from gateway.rules.import_pagerduty import import_pagerduty

    imported = import_pagerduty(
        {"integration": {"email_filter_mode": mode, "email_filters": filters}}
    )
    assert (imported.filter_mode, imported.filter_conditions) == expected
    assert imported.warnings == []
