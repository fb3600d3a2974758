"""`[filter]` (issue 15 item 2): mail must pass a rule file's filter before any rule is tried;
mail that does not pass is kept as `filtered`, visible everywhere, and never sent."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from gateway.errors import RuleError
from gateway.mail.parse import parse_message
from gateway.outcomes import Outcome
from gateway.rules import evaluate, load_ruleset
from gateway.web.metrics import Snapshot, store_families
from gateway.web.pages import parse_index_query
from tests.cli_support import Cli, config_with_secrets
from tests.conftest import RULES_DIR, desk_mail
from tests.pdserver import PagerDutyStandIn

FILTERED_RULES = """
    # only the helpdesk may page
    [filter]
    mode = "all"
    conditions = [
      { field = "from", op = "ends_with", value = "@helpdesk.example>", ignore_case = true },
      { field = "subject", op = "not_contains", value = "[TEST]" },
    ]

    [[rule]]
    name = "new case"
    conditions = [{ field = "body", op = "contains", value = "Status: New" }]
    action = "trigger"

    [unmatched]
    action = "trigger"
    """


def write(directory: Path, text: str, name: str = "filtered.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def decide(rules: Path, raw: bytes):
    return evaluate(load_ruleset([rules]), parse_message(raw))


# --------------------------------------------------------------------------- evaluation


def test_mail_that_fails_an_all_filter_is_filtered_before_any_rule(tmp_path: Path) -> None:
    rules = write(tmp_path, FILTERED_RULES)
    decision = decide(rules, desk_mail("Printer on fire", sender="mallory@evil.example"))
    assert decision.filtered and not decision.unmatched
    assert (decision.action, decision.rule, decision.incident_key) == ("discard", None, None)
    assert [step.rule for step in decision.trace] == ["[filter] (filtered.toml:2)"]
    assert 'condition 1 from ends_with "@helpdesk.example>" (ignore case): no' in decision.reason


def test_mail_that_passes_the_filter_goes_on_to_the_rules(tmp_path: Path) -> None:
    rules = write(tmp_path, FILTERED_RULES)
    decision = decide(rules, desk_mail("Printer on fire"))
    assert not decision.filtered
    assert (decision.rule, decision.action, decision.incident_key) == (
        "new case",
        "trigger",
        "Printer on fire",
    )
    assert decision.trace[0].matched and decision.trace[0].rule.startswith("[filter]")


def test_filter_mode_any_needs_one_condition(tmp_path: Path) -> None:
    rules = write(
        tmp_path,
        """
        [filter]
        mode = "any"
        conditions = [
          { field = "subject", op = "contains", value = "URGENT" },
          { field = "body", op = "matches", value = '(?m)^Priority: [5-9]$' },
        ]
        [[rule]]
        name = "all"
        conditions = [{ op = "always" }]
        action = "trigger"
        """,
    )
    assert not decide(rules, desk_mail("Printer on fire")).filtered  # Priority: 5
    assert not decide(rules, desk_mail("URGENT: disk")).filtered
    quiet = desk_mail("Lunch").replace(b"Priority: 5", b"Priority: 1")
    decision = decide(rules, quiet)
    assert decision.filtered
    assert "none of 2 conditions matched (any)" in decision.reason


def test_every_files_filter_must_pass(tmp_path: Path) -> None:
    first = write(tmp_path, FILTERED_RULES)
    second = write(
        tmp_path,
        """
        [filter]
        conditions = [{ field = "subject", op = "not_contains", value = "Lunch" }]
        """,
        "second.toml",
    )
    ruleset = load_ruleset([first, second])
    assert len(ruleset.filters) == 2
    decision = evaluate(ruleset, parse_message(desk_mail("Lunch menu")))
    assert decision.filtered and "second.toml:1" in decision.reason


def test_a_ruleset_without_filter_lets_everything_through(tmp_path: Path) -> None:
    ruleset = load_ruleset([RULES_DIR / "helpdesk.toml"])
    assert ruleset.filters == ()
    decision = evaluate(ruleset, parse_message(desk_mail("x", sender="a@b.example")))
    assert not decision.filtered and decision.rule == "new case"


# --------------------------------------------------------------------------- gateway check


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ('mode = "most"\nconditions = [{ op = "always" }]', 3, 'mode must be "all" or "any"'),
        ("conditions = []", 2, "conditions must be a non-empty list"),
        ('mode = "all"', 2, "missing conditions"),
        (
            'conditions = [\n  { op = "always" },\n  { field = "subjekt", op = "contains", '
            'value = "x" },\n]',
            5,
            "unknown field 'subjekt'",
        ),
        ('conditions = [{ field = "body", op = "matches", value = "(" }]', 3, "bad regex"),
        ('conditions = [{ op = "always" }]\naction = "trigger"', 4, "unknown key 'action'"),
    ],
    ids=["mode", "empty", "missing", "field", "regex", "unknown-key"],
)
def test_a_bad_filter_is_reported_with_file_and_line(
    tmp_path: Path, body: str, line: int, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"\n[filter]\n{body}\n", encoding="utf-8")
    # the [filter] header is on line 2; its keys from line 3
    with pytest.raises(RuleError) as caught:
        load_ruleset([path])
    [problem] = caught.value.problems
    assert problem.line == line, problem
    assert message in problem.message


def test_gateway_check_names_the_bad_filter_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = service_config(tmp_path, None, '[filter]\nmode = "some"\nconditions = []\n')
    result = Cli(config, capsys, monkeypatch)("check", secrets=True)
    assert result.code == 1
    text = result.out + result.err
    assert "filtered.toml:2" in text and 'mode must be "all" or "any"' in text
    assert "filtered.toml:1" in text and "non-empty list" in text  # at the table, as for rules


# --------------------------------------------------------------------------- the pipeline


def service_config(tmp_path: Path, pd_url: str | None, rules_text: str) -> Path:
    """A config whose helpdesk service uses one rule file, `filtered.toml`, in tmp_path."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "filtered.toml").write_text(rules_text, encoding="utf-8")
    config = config_with_secrets(tmp_path, pd_url)
    text = config.read_text(encoding="utf-8")
    text = text.replace(f'rules_dir = "{RULES_DIR.as_posix()}"', f'rules_dir = "{rules_dir}"')
    config.write_text(text.replace('"helpdesk.toml"', '"filtered.toml"'), encoding="utf-8")
    return config


def test_filtered_mail_is_kept_listed_and_never_sent(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = service_config(tmp_path, pd.url, textwrap.dedent(FILTERED_RULES))
    cli = Cli(config, capsys, monkeypatch)
    cli.ingest(desk_mail("Spoofed outage", sender="mallory@evil.example"))
    cli.ingest(desk_mail("[TEST] Printer on fire"))
    cli.ingest(desk_mail("Printer on fire"))
    [event] = pd.wait_for(1)
    assert event["dedup_key"] == "Printer on fire"
    out = cli("messages", "--outcome", "filtered", "--json").out
    listed = [json.loads(line) for line in out.splitlines()]
    assert sorted(m["subject"] for m in listed) == ["Spoofed outage", "[TEST] Printer on fire"]
    assert all(m["outcome"] == "filtered" and m["action"] in (None, "discard") for m in listed)
    assert all(m["reason"].startswith("filtered by [filter]") for m in listed)
    human = cli("messages").out
    assert human.count("filtered") >= 2
    assert len(pd.events) == 1  # the outbox is empty: nothing else was ever sent


def test_status_page_and_metrics_know_the_filtered_outcome() -> None:
    query = parse_index_query({"outcome": ["filtered"]}, ["helpdesk"])
    assert query.outcomes == ("filtered",)
    snapshot = Snapshot(
        totals=[("decisions", ("helpdesk", Outcome.FILTERED.value), 3)], gauges=[], latencies=[]
    )
    families = {f.name: f for f in store_families(snapshot)}
    [sample] = families["gateway_messages_filtered"].samples
    assert sample.labels == {"service": "helpdesk"} and sample.value == 3
