"""The loop guard: notifications are judged by the service's `loop_guard`; auto-replies, bounces
and the gateway's own mail are always ignored; test-rules and replay say what decided."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.mail.loop_guard import LOOP_HEADER, loop_verdict
from gateway.mail.parse import parse_message
from gateway.store import open_store
from gateway.themes.render import Themes, load_context
from tests.cli_support import Cli, config_with_secrets
from tests.conftest import (
    ROOT,
    RULES_DIR,
    GatewayProcess,
    desk_mail,
    free_port,
    wait_until,
    write_config,
)
from tests.pdserver import PagerDutyStandIn

CRONIE = ROOT / "tests" / "fixtures" / "packs" / "cron" / "10_cronie_auto_submitted.eml"
SETTINGS = ("strict", "replies")

OUT_OF_OFFICE = b"""\
From: Jane Admin <jane@acme.example>
To: cron@alerts.acme.example
Subject: Automatic reply: Cron <root@db1> /usr/local/bin/backup.sh --full
Auto-Submitted: auto-replied
Message-ID: <ooo.1@acme.example>
Content-Type: text/plain; charset="utf-8"

I am out of the office until Monday. Your message said:
> pg_dump: error: out of memory
> exit status: 1
"""


def cron_service(tmp_path: Path, pd: PagerDutyStandIn, setting: str | None) -> Path:
    """A production-like config whose one service uses the cron pack; `setting`: loop_guard."""
    config = config_with_secrets(tmp_path, pd.url)
    line = f'loop_guard = "{setting}"' if setting else ""
    text = config.read_text(encoding="utf-8")
    text = text.replace('rules = ["helpdesk.toml"]', f'rules = ["cron.toml"]\n{line}')
    config.write_text(text, encoding="utf-8")
    return config


def outcomes(cli: Cli) -> list[dict]:
    rows = [json.loads(x) for x in cli("messages", "--all", "--json").out.splitlines()]
    return sorted(rows, key=lambda m: m["message"])


# -- 1. notifications are judged by the setting, replies never are -----------------------------


def test_cronie_mail_reaches_the_cron_pack_and_triggers_when_the_service_opts_in(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = Cli(cron_service(tmp_path, pd, "replies"), capsys, monkeypatch)
    cli.ingest(CRONIE.read_bytes())
    [event] = pd.wait_for(1)
    assert event["event_action"] == "trigger"
    assert event["dedup_key"].startswith("db1-/usr/local/bin/backup.sh --full")
    [message] = outcomes(cli)
    assert (message["outcome"], message["rule"]) == ("triggered", "cron job failed")
    # the stored reason says the setting let the notification through
    assert "loop guard: Auto-Submitted: auto-generated" in message["reason"]
    assert 'passed to the rules because loop_guard = "replies"' in message["reason"]


@pytest.mark.parametrize("setting", [None, "strict"], ids=["default", "strict"])
def test_cronie_mail_is_loop_ignored_when_the_service_does_not_opt_in(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
) -> None:
    """Today's behaviour stays the default for existing services."""
    cli = Cli(cron_service(tmp_path, pd, setting), capsys, monkeypatch)
    cli.ingest(CRONIE.read_bytes())
    [message] = outcomes(cli)
    assert message["outcome"] == "loop_ignored"
    assert message["reason"].startswith("loop guard: Auto-Submitted: auto-generated")
    assert 'ignored because loop_guard = "strict"' in message["reason"]
    assert pd.events == []


@pytest.mark.parametrize("setting", SETTINGS)
def test_an_auto_replied_out_of_office_is_ignored_under_both_settings(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
) -> None:
    """It quotes a failed job's mail, so the cron rules would trigger if it reached them."""
    cli = Cli(cron_service(tmp_path, pd, setting), capsys, monkeypatch)
    cli.ingest(OUT_OF_OFFICE)
    [message] = outcomes(cli)
    assert message["outcome"] == "loop_ignored"
    assert "Auto-Submitted: auto-replied: an auto-reply, always ignored" in message["reason"]
    assert pd.events == []


@pytest.mark.parametrize(
    ("headers", "subject", "kind"),
    [
        ("Auto-Submitted: auto-replied", "Re: disk full", "an auto-reply"),
        ("Auto-Submitted: auto-generated\nX-Autoreply: yes", "Cron <root@db1> x", "an auto-reply"),
        ("Auto-Submitted: auto-generated\nPrecedence: junk", "Cron <root@db1> x", "an auto-reply"),
        ("Precedence: bulk", "Out of office: Cron <root@db1> x", "an auto-reply"),
        ("X-Auto-Response-Suppress: All", "Automatic reply: disk full", "an auto-reply"),
        ("Auto-Submitted: some-future-keyword", "Cron <root@db1> x", "an auto-reply"),
        ("Content-Type: multipart/report; report-type=delivery-status", "x", "a bounce"),
    ],
    ids=[
        "auto-replied",
        "generated+x-autoreply",
        "generated+junk",
        "bulk+ooo",
        "suppress+ooo",
        "unknown-keyword",
        "multipart-report",
    ],
)
@pytest.mark.parametrize("setting", SETTINGS)
def test_replies_and_bounces_are_ignored_whatever_the_setting(
    headers: str, subject: str, kind: str, setting: str
) -> None:
    raw = f"From: a@b.example\nSubject: {subject}\n{headers}\n\nexit status: 1\n".encode()
    verdict = loop_verdict(parse_message(raw), mode=setting)
    assert verdict.ignored and verdict.kind == kind
    assert "always ignored" in verdict.describe()


@pytest.mark.parametrize("keyword", ["auto-generated", "auto-notified", "Auto-Generated (cron)"])
def test_notifications_follow_the_setting(keyword: str) -> None:
    raw = f"From: a@b.example\nSubject: Cron <root@db1> x\nAuto-Submitted: {keyword}\n\nx\n"
    mail = parse_message(raw.encode())
    assert loop_verdict(mail, mode="strict").ignored
    passed = loop_verdict(mail, mode="replies")
    assert not passed.ignored and passed.kind == "notification" and passed.setting == "replies"
    assert mail.is_auto_reply  # the strict view older callers read is unchanged


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        ("Auto-Submitted: auto-generated\nX-Auto-Response-Suppress: All", "Out of office: VPN"),
        ("Auto-Submitted: auto-generated\nPrecedence: bulk", "Absence calendar down (ITSM-7)"),
    ],
    ids=["zendesk-ooo-words", "jira-absence-words"],
)
def test_a_declared_notification_with_vacation_words_in_its_subject_is_still_a_notification(
    headers: str, subject: str
) -> None:
    """A ticket titled 'Out of office ...' must page under replies, not pass for a vacation
    reply: the subject guesses are for mail that does not say what it is."""
    raw = f"From: a@b.example\nSubject: {subject}\n{headers}\n\nStatus: Open\n".encode()
    mail = parse_message(raw)
    assert not loop_verdict(mail, mode="replies").ignored
    assert loop_verdict(mail, mode="strict").kind == "notification"


def test_several_auto_submitted_fields_any_reply_keyword_makes_it_a_reply() -> None:
    raw = b"From: a@b.example\nSubject: x\nAuto-Submitted: auto-generated\n"
    raw += b"Auto-Submitted: auto-replied\n\nx\n"
    verdict = loop_verdict(parse_message(raw), mode="replies")
    assert verdict.ignored and verdict.signal == "Auto-Submitted: auto-replied"


@pytest.mark.parametrize(
    "headers",
    ["", "Auto-Submitted: no", "Precedence: bulk\nX-Auto-Response-Suppress: All"],
    ids=["plain", "auto-submitted-no", "helpdesk-bulk"],
)
def test_ordinary_mail_passes_with_no_note(headers: str) -> None:
    raw = f"From: a@b.example\nSubject: Disk full\n{headers}\n\nx\n".encode()
    verdict = loop_verdict(parse_message(raw), mode="strict")
    assert not verdict.ignored and verdict.describe() == ""


# -- 2. the gateway's own mail is always ignored ----------------------------------------------


def test_every_theme_mail_the_gateway_sends_on_its_own_account_carries_the_stamp() -> None:
    themes = Themes(ROOT / "templates", installation_id="acme-prod")
    context = load_context(ROOT / "templates" / "incident_update" / "sample.json")
    own = themes.render("incident_update", context)
    assert own.get_all(LOOP_HEADER) == ["acme-prod"]
    assert own["Auto-Submitted"] == "auto-generated"
    for name in themes.names():  # any theme, e.g. a twoway update theme added later
        msg = themes.render_sample(name)
        assert msg.get_all(LOOP_HEADER) == ["acme-prod"], name
        assert msg["Auto-Submitted"] is not None, name


def test_a_helpdesk_case_rendered_for_intake_carries_no_stamp_and_a_theme_cannot_forge_one(
    tmp_path: Path,
) -> None:
    """`gateway notify case_new` is the helpdesk's mail, meant to open an incident."""
    themes = Themes(ROOT / "templates", installation_id="acme-prod")
    case = load_context(ROOT / "tests" / "fixtures" / "case29.json")
    msg = themes.render("case_new", case, for_intake=True)
    assert msg[LOOP_HEADER] is None and msg["Auto-Submitted"] is None
    forged = tmp_path / "t"
    forged.mkdir()
    (forged / "message.txt.j2").write_text(f"To: a@b.example\n{LOOP_HEADER}: other\n\nbody\n")
    stamped = Themes(tmp_path, installation_id="acme-prod").render("t", {}, default_from="g@x.ex")
    assert stamped.get_all(LOOP_HEADER) == ["acme-prod"]
    unstamped = Themes(tmp_path).render("t", {}, default_from="g@x.ex", for_intake=True)
    assert unstamped[LOOP_HEADER] is None


def test_another_installations_stamp_is_not_our_own_mail() -> None:
    raw = b"From: a@b.example\nSubject: x\nX-Gateway-Loop: staging\n\nx\n"
    assert not loop_verdict(parse_message(raw), mode="replies", installation_id="prod").ignored
    assert loop_verdict(parse_message(raw), mode="replies", installation_id="staging").ignored


LOOPBACK_RULES = """
[[rule]]
name = "new case"
conditions = [{ field = "body", op = "contains", value = "Status: New" }]
action = "trigger"
incident_key = { field = "subject" }

[unmatched]
action = "trigger"   # anything else pages too: the returning update mail would, unguarded
"""


@pytest.fixture
def looping_gateway(
    request: pytest.FixtureRequest, tmp_path: Path, pd: PagerDutyStandIn
) -> Iterator[GatewayProcess]:
    """A gateway whose helpdesk notifications go, through its `[outgoing]` relay, to its own
    SMTP listener and integration address: every update mail comes straight back."""
    rules = tmp_path / "loopback.toml"
    rules.write_text(LOOPBACK_RULES)
    port = free_port()
    config = write_config(
        tmp_path,
        pd_url=pd.url,
        smtp_port=port,
        service_extra=(
            f'loop_guard = "{request.param}"\n'
            'notify = { theme = "incident_update", to = ["desk@gateway.example"],'
            ' on = ["trigger", "duplicate", "acknowledge", "resolve"] }'
        ),
        extra=(f'[outgoing]\nhost = "127.0.0.1"\nport = {port}\nfrom = "gw@gateway.test"\n'),
    )
    text = config.read_text().replace('rules = ["helpdesk.toml"]', f'rules = ["{rules}"]')
    text = text.replace("[gateway]\n", '[gateway]\ninstallation_id = "acme-prod"\n')
    config.write_text(text)
    process = GatewayProcess(config, port).start()
    yield process
    process.stop()


@pytest.mark.parametrize("looping_gateway", SETTINGS, indirect=True)
def test_the_gateways_own_mail_fed_back_over_smtp_is_loop_ignored_under_both_settings(
    looping_gateway: GatewayProcess, pd: PagerDutyStandIn, tmp_path: Path
) -> None:
    with smtplib.SMTP("127.0.0.1", looping_gateway.port) as client:
        client.sendmail("support@helpdesk.example", ["desk@gateway.example"], desk_mail("VPN"))
    store = open_store(tmp_path / "data" / "gateway.sqlite3")
    jobs = wait_until(
        lambda: (done := [j for j in store.jobs() if j.outcome]) and len(done) >= 2 and done,
        message=f"the update mail did not come back:\n{looping_gateway.output()}",
    )
    case, update = sorted(jobs, key=lambda j: j.id)[:2]
    assert case.outcome == "triggered"
    assert update.outcome == "loop_ignored"
    assert update.reason is not None
    assert update.reason.startswith("loop guard: X-Gateway-Loop: acme-prod: the gateway's own")
    assert "always ignored" in update.reason
    [event] = pd.wait_for(1)  # the case's trigger, delivered by the outbox in its own time
    assert event["event_action"] == "trigger"
    assert len(pd.events) == 1  # nothing looped to PagerDuty
    assert len(store.jobs()) == 2


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ('loop_guard = "sometimes"', "loop_guard", "must be one of strict, replies"),
        ("loop_guard = true", "loop_guard", "must be a string"),
    ],
    ids=["unknown-mode", "boolean"],
)
def test_a_bad_loop_guard_is_an_error_with_file_and_line(
    tmp_path: Path, section: str, line: str, message: str
) -> None:
    path = write_config(tmp_path, service_extra=section)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert path.read_text().splitlines()[problem.line - 1].startswith(line)
    assert message in problem.message
    assert str(info.value).startswith(f"{path}:{problem.line}:")


def test_a_bad_installation_id_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("[gateway]\n", '[gateway]\ninstallation_id = "a b"\n'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert (problem.line, problem.key) == (3, "gateway.installation_id")
    assert "1-64 letters, digits" in problem.message


def test_the_defaults_keep_todays_behaviour(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    assert config.services[0].loop_guard == "strict"
    assert config.gateway.installation_id == "gateway"


# -- 3. test-rules and replay say which reason applied and what decided -------------------------


def test_test_rules_shows_the_reason_and_that_the_setting_decided(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = Cli(cron_service(tmp_path, pd, "replies"), capsys, monkeypatch)
    passed = cli("test-rules", str(CRONIE))
    assert "note:     the loop guard lets this mail through: Auto-Submitted: auto-generated" in (
        passed.out
    )
    assert 'because loop_guard = "replies"' in passed.out
    decision = json.loads(cli("test-rules", str(CRONIE), "--loop-guard", "strict", "--json").out)
    assert decision["loop_guard"] == "Auto-Submitted: auto-generated"
    assert decision["loop_guard_setting"] == "strict"
    assert 'ignored because loop_guard = "strict"' in decision["loop_guard_decision"]
    ooo = tmp_path / "ooo.eml"
    ooo.write_bytes(OUT_OF_OFFICE)
    reply = json.loads(cli("test-rules", str(ooo), "--json").out)
    assert reply["loop_guard"] == "Auto-Submitted: auto-replied"
    assert reply["loop_guard_setting"] is None  # no setting decided: replies are always ignored
    assert "always ignored" in reply["loop_guard_decision"]


def test_replay_shows_what_switching_the_setting_would_change(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli = Cli(cron_service(tmp_path, pd, None), capsys, monkeypatch)
    cli.ingest(CRONIE.read_bytes())
    cli.ingest(OUT_OF_OFFICE)
    # nothing changes under the service's own (strict) setting
    assert cli("replay", "--since", "1h", "--json").out.strip() == ""
    rows = cli("replay", "--since", "1h", "--loop-guard", "replies", "--all", "--json").out
    cron, ooo = sorted(map(json.loads, rows.splitlines()), key=lambda r: r["message"])
    assert cron["changed"] and cron["stored"]["outcome"] == "loop_ignored"
    assert cron["would_be"]["outcome"] == "trigger"
    assert 'passed to the rules because loop_guard = "replies"' in cron["loop_guard"]
    assert not ooo["changed"] and "always ignored" in ooo["loop_guard"]
    table = cli("replay", "--since", "1h", "--loop-guard", "replies").out
    assert "loop guard" in table and 'loop_guard = "replies"' in table


@pytest.mark.parametrize("setting", [None, "replies"], ids=["default", "replies"])
def test_check_notes_a_strict_service_on_a_pack_whose_mail_it_would_ignore(
    tmp_path: Path,
    pd: PagerDutyStandIn,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
) -> None:
    cli = Cli(cron_service(tmp_path, pd, setting), capsys, monkeypatch)
    result = cli("check", secrets=True)
    assert result.code == 0, result
    note = "NOTE: service 'helpdesk' uses cron.toml with loop_guard = \"strict\""
    assert (note in result.out) == (setting is None)


def test_the_cron_pack_header_no_longer_needs_the_postfix_workaround() -> None:
    header = (RULES_DIR / "cron.toml").read_text(encoding="utf-8").split("\n[", 1)[0]
    assert "header_checks" not in header
    assert 'loop_guard = "replies"' in header
