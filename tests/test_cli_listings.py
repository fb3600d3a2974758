"""What the listings show: one id per mail, sender and subject, counts, JSON lines with the
documented fields, validated filters, and mail text that cannot drive the terminal."""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

import pytest

from gateway.mail.parse import parse_message
from gateway.mail.summary import subject_and_from
from gateway.outcomes import Outcome
from tests.cli_support import Cli, config_with_secrets, run_gateway
from tests.conftest import ROOT, GatewayProcess, desk_mail, wait_until, write_config
from tests.net import free_port
from tests.pdserver import PagerDutyStandIn

README = (ROOT / "README.md").read_text()
# a subject that, printed raw, sets the terminal title, turns text red and rings the bell
HOSTILE = "Printer \x1b]0;pwned\x07on \x1b[31mfire\x1b[0m\u202e"
ESCAPED = "Printer \\x1b]0;pwned\\x07on \\x1b[31mfire\\x1b[0m\\u202e"


@pytest.fixture
def cli(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Cli:
    return Cli(config_with_secrets(tmp_path, pd.url), capsys, monkeypatch)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def hostile_mail() -> bytes:
    header = f"Subject: {HOSTILE}\r\nFrom: Mallory \x1b[2J<mallory@evil.example>\r\n"
    return header.encode() + b"\r\nStatus: New\r\n"


# -- 15: terminal escape sequences ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["messages"], ["incidents"], ["messages", "--json"], ["incidents", "--json"]]
)
def test_listings_escape_terminal_sequences_from_mail(cli: Cli, command: list[str]) -> None:
    cli.ingest(hostile_mail())
    result = cli(*command)
    assert result.code == 0, result.err
    for char in "\x1b\x07\u202e":
        assert char not in result.out
    if "--json" in command:
        [row] = json_lines(result.out)
        assert HOSTILE in (row.get("subject"), row.get("key"))  # JSON escapes, loses nothing
    else:
        assert ESCAPED in result.out


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_test_rules_escapes_terminal_sequences_from_mail(cli: Cli, json_output: bool) -> None:
    path = cli.config.parent / "hostile.eml"
    path.write_bytes(hostile_mail())
    result = cli("test-rules", str(path), *(["--json"] if json_output else []))
    assert result.code == 0, result.err
    assert "\x1b" not in result.out and "\x07" not in result.out
    if json_output:
        [decision] = json_lines(result.out)
        assert decision["subject"] == decision["incident_key"] == HOSTILE
    else:
        assert f"key:      {ESCAPED}" in result.out


def test_error_lines_escape_what_they_quote(cli: Cli) -> None:
    cli.ingest(desk_mail("Printer on fire"))
    result = cli("messages", "--service", "help\x1b[2Jdesk")
    assert result.code == 1 and "\x1b" not in result.err and "help\\x1b[2Jdesk" in result.err


# -- 20: --json, showing N of M, --limit/--all, validated filters -------------------------------


def documented_fields(command: str) -> set[str]:
    """The fields the README's command reference lists for `gateway COMMAND --json`."""
    [line] = [x for x in README.splitlines() if x.startswith(f"* `gateway {command} --json`:")]
    listed = line.split(":", 1)[1].split("; a mail a rule fails on")[0]
    return set(re.findall(r"`(\w+)`", listed)) - {"null", "pending", "done"}


def test_every_listing_prints_one_json_object_per_line_with_the_documented_fields(
    cli: Cli,
) -> None:
    cli.ingest(desk_mail("Printer on fire"))
    cli.ingest(desk_mail("Disk full"))
    cli.ingest(desk_mail("Printer on fire", "Resolved"))
    incidents = json_lines(cli("incidents", "--json").out)
    messages = json_lines(cli("messages", "--json").out)
    replayed = json_lines(cli("replay", "--since", "1h", "--all", "--json").out)
    assert (len(incidents), len(messages), len(replayed)) == (2, 3, 3)
    for command, rows in (("incidents", incidents), ("messages", messages), ("replay", replayed)):
        for row in rows:
            assert set(row) == documented_fields(command), command
    path = cli.config.parent / "mail.eml"
    path.write_bytes(desk_mail("Printer on fire"))
    [decision] = json_lines(cli("test-rules", str(path), "--json").out)
    assert set(decision) == documented_fields("test-rules")
    assert decision["subject"] == "Printer on fire" and decision["action"] == "trigger"


def test_json_rows_carry_values_not_table_text(cli: Cli) -> None:
    cli.ingest(desk_mail("0012"), "--sender", "support@helpdesk.example")
    [incident] = json_lines(cli("incidents", "--json").out)
    assert (incident["key"], incident["state"], incident["triggers"]) == ("0012", "triggered", 1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", incident["first_seen"])
    assert incident["resolved_at"] is None
    [message] = json_lines(cli("messages", "--json").out)
    assert (message["message"], message["outcome"], message["key"]) == (1, "triggered", "0012")
    assert message["sender"] == "support@helpdesk.example"
    assert message["from"] == "Helpdesk <support@helpdesk.example>"
    assert "0012" in cli("incidents").out  # a table shows the key as written, not as 12


def test_human_listings_say_showing_n_of_m_and_take_limit_and_all(cli: Cli) -> None:
    for n in range(4):
        cli.ingest(desk_mail(f"Case {n}"))
    limited = cli("messages", "--limit", "3").out
    assert limited.rstrip().endswith("showing 3 of 4 messages (--limit N or --all for more)")
    assert "Case 3" in limited and "Case 0" not in limited  # the newest first
    assert cli("messages", "--all").out.rstrip().endswith("showing 4 of 4 messages")
    assert len(json_lines(cli("messages", "--limit", "2", "--json").out)) == 2
    assert len(json_lines(cli("messages", "--all", "--json").out)) == 4
    assert (
        cli("incidents", "--limit", "1")
        .out.rstrip()
        .endswith("showing 1 of 4 incidents (--limit N or --all for more)")
    )
    assert cli("incidents", "--all", "--open").out.rstrip().endswith("showing 4 of 4 incidents")
    with pytest.raises(SystemExit) as refused:  # argparse: not a positive number
        cli("incidents", "--limit", "0")
    assert refused.value.code == 2


def test_all_pages_through_a_big_spool(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import listings

    monkeypatch.setattr(listings, "PAGE", 2)  # so that --all needs several queries
    for n in range(5):
        cli.ingest(desk_mail(f"Case {n}"))
    rows = json_lines(cli("messages", "--all", "--json").out)
    assert [r["subject"] for r in rows] == [f"Case {n}" for n in reversed(range(5))]
    rows = json_lines(cli("messages", "--limit", "3", "--json").out)
    assert [r["subject"] for r in rows] == ["Case 4", "Case 3", "Case 2"]


def test_messages_show_subject_and_sender(cli: Cli) -> None:
    cli.ingest(desk_mail("=?utf-8?q?Caf=C3=A9_printer?= on fire", sender="jane@desk.example"))
    out = cli("messages").out
    [row] = [line for line in out.splitlines() if "Café printer on fire" in line]
    assert "Helpdesk <jane@desk.example>" in row
    header = out.splitlines()[0].split()
    assert header[:6] == ["message", "received", "source", "service", "from", "subject"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--outcome", "unmached"], "unknown outcome 'unmached' (did you mean 'unmatched'?)"),
        (["--outcome", "unmatched", "triggerd"], "unknown outcome 'triggerd'"),
        (["--service", "helpdsk"], "unknown service 'helpdsk' (did you mean 'helpdesk'?)"),
    ],
)
def test_an_unknown_outcome_or_service_is_an_error_naming_the_known_values(
    cli: Cli, args: list[str], words: str
) -> None:
    cli.ingest(desk_mail("Printer on fire"))
    result = cli("messages", *args)
    assert result.code == 1 and result.out == ""
    [line] = result.err.splitlines()
    assert words in line and "known: " in line
    assert "helpdesk" in line if "--service" in args else "resolve_no_open_incident" in line


def test_every_outcome_and_pending_are_accepted(cli: Cli) -> None:
    cli.ingest(desk_mail("Printer on fire"), "--no-deliver")  # accepted, not decided yet
    for outcome in [*Outcome, "pending"]:
        assert cli("messages", "--outcome", outcome).code == 0, outcome
    [row] = json_lines(cli("messages", "--outcome", "pending", "--json").out)
    assert (row["state"], row["outcome"]) == ("pending", None)
    assert cli("incidents", "--service", "nope").code == 1


def test_a_service_that_only_the_store_remembers_is_accepted(cli: Cli) -> None:
    cli.ingest(desk_mail("Printer on fire"))
    cli.config.write_text(cli.config.read_text().replace('"helpdesk"', '"desk"'))
    result = cli("messages", "--service", "helpdesk", "--json")  # renamed since
    assert result.code == 0 and len(json_lines(result.out)) == 1


# -- 21: one id for a mail everywhere --------------------------------------------------------------


def test_messages_list_mail_by_the_id_smtp_queued_it_as(tmp_path: Path) -> None:
    port = free_port()
    second = '\n[[service]]\nname = "ops"\naddresses = ["ops@*"]\nrules = ["helpdesk.toml"]\n'
    config = write_config(tmp_path, routing_key=None, smtp_port=port, extra=second)
    gateway = GatewayProcess(config, port).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:  # one mail, two jobs
            client.sendmail("a@helpdesk.example", ["desk@x", "ops@x"], desk_mail("First"))
            client.mail("support@helpdesk.example")
            client.rcpt("desk@gateway.example")
            code, reply = client.data(desk_mail("Printer on fire"))
        assert code == 250
        queued = int(re.search(rb"queued as (\d+)", reply).group(1))  # type: ignore[union-attr]

        def listed() -> list[dict]:
            out = run_messages(config)
            return [r for r in out if r["subject"] == "Printer on fire" and r["state"] == "done"]

        [row] = wait_until(listed, message="the mail was not decided")
        assert row["message"] == queued and row["job"] == 3  # the job id differs, secondary
        log = wait_until(lambda: "key='Printer on fire'" in gateway.output() and gateway.output())
    finally:
        gateway.stop()
    [decided] = [x for x in log.splitlines() if "key='Printer on fire'" in x]
    assert f"message={queued} job=3 " in decided
    [would_send] = [x for x in log.splitlines() if "would send" in x and "Printer on" in x]
    assert f"message={queued} job=3:" in would_send


def run_messages(config: Path) -> list[dict]:
    result = run_gateway("--config", str(config), "messages", "--json")
    assert result.returncode == 0, result.stderr
    return json_lines(result.stdout)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "tests" / "fixtures").rglob("*.eml")), ids=lambda p: p.name
)
def test_the_listed_subject_is_the_one_the_rules_see(path: Path) -> None:
    raw = path.read_bytes()[:16384]  # what `list_jobs` hands over
    subject, sender = subject_and_from(raw)
    mail = parse_message(raw)
    assert subject == mail.subject
    assert mail.from_addr in sender.lower()
