"""The helpdesk rule packs (issue 15 item 1): every fixture mail of every pack through
`gateway test-rules` (action, key, severity), each pack's theme through its own rules, and one
ticket's new / assignment / resolution / reopening mails meeting in one incident."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import RuleError
from gateway.mail.parse import parse_message
from gateway.rules import evaluate, load_ruleset
from gateway.themes.render import Themes
from tests.cli_support import Cli, config_with_secrets
from tests.conftest import ROOT, RULES_DIR
from tests.pdserver import PagerDutyStandIn

PACKS = ("zendesk", "freshdesk", "jira_service_management", "servicenow", "cron")
FIXTURES = ROOT / "tests" / "fixtures" / "packs"


def expectations(pack: str) -> dict[str, dict]:
    return json.loads((FIXTURES / pack / "expected.json").read_text(encoding="utf-8"))


CASES = [
    pytest.param(pack, name, expected, id=f"{pack}/{name}")
    for pack in PACKS
    for name, expected in expectations(pack).items()
]


def test_rules(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    """`gateway test-rules ... --json` in this process: its one JSON line."""
    capsys.readouterr()
    assert main(["test-rules", *args, "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    return json.loads(line)


test_rules.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.mark.parametrize(("pack", "name", "expected"), CASES)
def test_pack_fixture_gives_the_expected_action_key_and_severity(
    capsys: pytest.CaptureFixture[str], pack: str, name: str, expected: dict
) -> None:
    mail = FIXTURES / pack / name
    decision = test_rules(capsys, str(mail), "--rules", str(RULES_DIR / f"{pack}.toml"))
    assert decision["action"] == expected["action"], decision["trace"]
    assert decision["incident_key"] == expected["key"], decision["trace"]
    if "severity" in expected:
        assert decision["severity"] == expected["severity"]
    if "rule" in expected:
        assert decision["rule"] == expected["rule"]
    if expected["action"] == "discard":
        assert decision["unmatched"] is True  # kept, visible, nothing sent
    assert decision["loop_guard"] == expected.get("loop_guard")


@pytest.mark.parametrize("pack", PACKS)
def test_every_pack_has_the_five_kinds_of_fixture(pack: str) -> None:
    """Plain text, HTML-only, localised (where the helpdesk localises), a reply chain and a
    mail that must not match, judged from the mails themselves."""
    expected = expectations(pack)
    mails = {name: parse_message((FIXTURES / pack / name).read_bytes()) for name in expected}
    assert any(m.text and not m.html for m in mails.values()), "plain text"
    html_only = [m for m in mails.values() if m.headers["content-type"][0].startswith("text/html")]
    assert html_only, "HTML-only"
    replies = [m for m in mails.values() if m.subject.lower().startswith(("re:", "aw:"))]
    assert replies, "reply chain"
    assert any(e["action"] == "discard" for e in expected.values()), "must not match"
    if pack != "cron":  # cron does not localise
        localised = [n for n in expected if "german" in n or "french" in n]
        assert len(localised) >= 2 and all(not mails[n].text.isascii() for n in localised)


@pytest.mark.parametrize("pack", [p for p in PACKS if p != "cron"])
def test_trigger_links_back_to_the_ticket(capsys: pytest.CaptureFixture[str], pack: str) -> None:
    triggers = [n for n, e in expectations(pack).items() if e["action"] == "trigger"]
    for name in triggers:
        mail = FIXTURES / pack / name
        decision = test_rules(capsys, str(mail), "--rules", str(RULES_DIR / f"{pack}.toml"))
        [link] = decision["links"]
        assert link["href"].startswith("https://") and decision["incident_key"] in link["text"]
        assert "&amp;" not in link["href"]


@pytest.mark.parametrize("pack", PACKS)
def test_pack_theme_renders_a_mail_its_rules_trigger_on(pack: str) -> None:
    """`gateway render <pack>` gives the notification to paste; its own rules must page on it."""
    themes = Themes(ROOT / "templates")
    raw = themes.render_sample(pack).as_bytes()
    decision = evaluate(load_ruleset([RULES_DIR / f"{pack}.toml"]), parse_message(raw))
    assert decision.action == "trigger", decision.trace
    assert decision.incident_key


@pytest.mark.parametrize("pack", PACKS)
def test_pack_header_shows_the_template_to_paste(pack: str) -> None:
    text = (RULES_DIR / f"{pack}.toml").read_text(encoding="utf-8")
    placeholder = {
        "zendesk": "{{ticket.id}}",
        "freshdesk": "{{ticket.id}}",
        "jira_service_management": "{{issue.key}}",
        "servicenow": "${number}",
        "cron": "Cron <",
    }[pack]
    header = text.split("\n[", 1)[0]
    assert placeholder in header


def zendesk_service(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setting: str = "",
) -> Cli:
    """The one service of a production-like config, on zendesk.toml, with `setting` added."""
    config = config_with_secrets(tmp_path, pd.url)
    text = config.read_text(encoding="utf-8").replace('"helpdesk.toml"', '"zendesk.toml"')
    text = text.replace('rules = ["zendesk.toml"]', f'rules = ["zendesk.toml"]\n{setting}')
    config.write_text(text, encoding="utf-8")
    return Cli(config, capsys, monkeypatch)


def test_one_tickets_mails_meet_in_one_incident(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New, assignment (HTML-only), German resolution, then a reopening reply whose subject
    lost the ticket number: one Zendesk incident, opened twice, and one PagerDuty dedup_key."""
    # Zendesk stamps Auto-Submitted: auto-generated; the service opts in, as the README says
    cli = zendesk_service(tmp_path, pd, capsys, monkeypatch, 'loop_guard = "replies"')
    names = sorted(expectations("zendesk"))
    for name in names:
        cli.ingest((FIXTURES / "zendesk" / name).read_bytes())
    events = pd.wait_for(5)  # 07, a repeat of the open 4711, is coalesced: nothing more to send
    assert {e["dedup_key"] for e in events} == {"4711", "4802"}
    incidents = {
        row["key"]: row for row in map(json.loads, cli("incidents", "--json").out.splitlines())
    }
    ticket = incidents["4711"]
    assert ticket["state"] == "triggered" and ticket["times_opened"] == 2  # reopened by 04
    messages = [json.loads(x) for x in cli("messages", "--all", "--json").out.splitlines()]
    outcomes = [m["outcome"] for m in sorted(messages, key=lambda m: m["message"])]
    assert outcomes == [
        "triggered",  # 01 new, plain text
        "acknowledged",  # 02 assigned, HTML-only
        "resolved",  # 03 German "Gelöst", subject in German with "AW:"
        "triggered",  # 04 reply whose subject lost "(#4711)": keyed by the body's link
        "acknowledge_no_open_incident",  # 05 another ticket, French "En attente"
        "unmatched",  # 06 the satisfaction survey
        "trigger_duplicate",  # 07 HTML reply: its own "Open" counts, not the quoted "Solved"
    ]
    assert (
        "coalesced into outbox item" in sorted(messages, key=lambda m: m["message"])[-1]["reason"]
    )
    assert len(pd.events) == 5


# --------------------------------------------------------------------------- incident_key lists

KEY_LIST_RULES = """
[[rule]]
name = "ticket"
conditions = [{ op = "always" }]
action = "trigger"
incident_key = [
  { field = "subject", regex = '\\(#(\\d+)\\)' },
  { field = "body", regex = '/tickets/(\\d+)' },
]
"""


def key_list_decision(tmp_path: Path, subject: str, body: str):
    path = tmp_path / "keys.toml"
    path.write_text(KEY_LIST_RULES, encoding="utf-8")
    raw = f"Subject: {subject}\r\nFrom: a@b.example\r\n\r\n{body}\r\n".encode()
    return evaluate(load_ruleset([path]), parse_message(raw))


def test_a_key_list_takes_the_first_extractor_that_finds_a_key(tmp_path: Path) -> None:
    both = key_list_decision(tmp_path, "Disk full (#12)", "https://x.example/tickets/99")
    assert both.incident_key == "12"
    body_only = key_list_decision(tmp_path, "Re: disk full", "https://x.example/tickets/99")
    assert body_only.incident_key == "99"


def test_a_key_list_that_finds_nothing_does_not_match_and_says_what_it_tried(
    tmp_path: Path,
) -> None:
    decision = key_list_decision(tmp_path, "Disk full", "no link")
    assert decision.unmatched
    [step] = decision.trace
    assert "incident key not found (subject regex" in step.reason
    assert "or body regex '/tickets/(\\\\d+)')" in step.reason


@pytest.mark.parametrize(
    ("key", "line", "message"),
    [
        ("[]", 5, "incident_key must not be an empty list"),
        ('[{ field = "subject" }, { field = "bodie" }]', 5, "unknown field 'bodie'"),
        ('[{ field = "subject" }, { field = "body", regex = "(" }]', 5, "bad regex"),
    ],
    ids=["empty", "field", "regex"],
)
def test_a_bad_key_list_is_reported_with_file_and_line(
    tmp_path: Path, key: str, line: int, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[rule]]\nname = "x"\nconditions = [{ op = "always" }]\naction = "trigger"\n'
        f"incident_key = {key}\n",
        encoding="utf-8",
    )
    with pytest.raises(RuleError) as caught:
        load_ruleset([path])
    [problem] = caught.value.problems
    assert (problem.line, message in problem.message) == (line, True), problem


@pytest.mark.parametrize("pack", PACKS)
def test_the_packs_commented_filter_admits_its_own_helpdesk(tmp_path: Path, pack: str) -> None:
    """Uncommented, with the fixtures' domain for "yourcompany", each pack's [filter] loads and
    lets every mail of that helpdesk through, and stops a stranger's copy of one."""
    text = (RULES_DIR / f"{pack}.toml").read_text(encoding="utf-8")
    block = text[text.index("# [filter]") :].split("\n\n", 1)[0]
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    rules = tmp_path / f"{pack}.toml"
    rules.write_text(text + "\n" + uncommented.replace("yourcompany", "acme") + "\n")
    ruleset = load_ruleset([rules])
    assert len(ruleset.filters) == 1
    for name, expected in expectations(pack).items():
        raw = (FIXTURES / pack / name).read_bytes()
        decision = evaluate(ruleset, parse_message(raw))
        if expected["action"] != "discard":
            assert not decision.filtered and decision.action == expected["action"], name
    first = sorted(expectations(pack))[0]
    raw = (FIXTURES / pack / first).read_bytes()
    forged = raw.replace(b"acme", b"evil", 1)  # the From line comes first in these fixtures
    assert evaluate(ruleset, parse_message(forged)).filtered
