"""The whole pipeline through the operator's commands: ingest -> rules -> incidents -> PagerDuty.

Real SQLite files, the real CLI entry point, and a local HTTP server honouring the Events API
contract in place of PagerDuty.
"""

from __future__ import annotations

import base64
import quopri
import re
from pathlib import Path

import pytest

from gateway.cli import EX_OK, EX_TEMPFAIL, EX_USAGE, main
from gateway.store import Store, open_store
from tests.conftest import ROUTING_KEY, desk_mail, write_config
from tests.pdserver import PagerDutyStandIn
from tests.store_support import counts


class Gateway:
    """Runs `gateway ...` in-process against one config and returns (exit code, stdout)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str]:
        self.capsys.readouterr()
        code = main(["--config", str(self.config), *args])
        out = self.capsys.readouterr()
        return code, out.out + out.err

    def ingest(self, raw: bytes, *extra: str) -> tuple[int, str]:
        path = self.config.parent / "in.eml"
        path.write_bytes(raw)
        return self("ingest", str(path), "--service", "helpdesk", *extra)

    @property
    def store(self) -> Store:
        return open_store(self.config.parent / "data" / "gateway.sqlite3")


@pytest.fixture
def gateway(tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]) -> Gateway:
    return Gateway(write_config(tmp_path, pd_url=pd.url), capsys)


def events(pd: PagerDutyStandIn) -> list[tuple[str, str]]:
    return [(e["event_action"], e["dedup_key"]) for e in pd.events]


def test_new_case_triggers_with_subject_as_dedup_key(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    code, out = gateway.ingest(desk_mail("Printer on fire in building 2"))
    assert code == EX_OK and "accepted as message 1" in out
    assert events(pd) == [("trigger", "Printer on fire in building 2")]
    event = pd.events[0]
    assert event["routing_key"] == ROUTING_KEY
    assert event["payload"]["summary"] == "Printer on fire in building 2"
    assert event["payload"]["custom_details"]["case"] == "29"
    assert event["client"] == "email-gateway"


def test_desk_com_lifecycle(gateway: Gateway, pd: PagerDutyStandIn) -> None:
    gateway.ingest(desk_mail("Printer on fire"))
    gateway.ingest(desk_mail("Printer on fire"))  # a second "new" mail for the same case
    code, out = gateway("incidents")
    assert code == EX_OK
    # one incident, triggered, counted twice (triggers, acks, resolves)
    assert re.search(r"helpdesk\s+Printer on fire\s+triggered\s+2\s+0\s+0", out), out

    gateway.ingest(desk_mail("Re: Printer on fire", "Resolved"))
    assert events(pd) == [
        ("trigger", "Printer on fire"),
        # issue 12: the second "new" mail is coalesced into the trigger PagerDuty already has
        ("resolve", "Printer on fire"),
    ]
    [incident] = gateway.store.incidents()
    assert (incident.state, incident.trigger_count, incident.resolve_count) == ("resolved", 2, 1)
    assert incident.coalesced == 1


def test_resolve_without_open_incident_is_recorded_and_harmless(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    code, out = gateway.ingest(desk_mail("Never opened", "Resolved"))
    assert code == EX_OK and "resolve_no_open_incident" in out
    assert gateway.store.incidents() == []
    assert [j.outcome for j in gateway.store.jobs()] == ["resolve_no_open_incident"]


def test_same_message_twice_is_processed_once(gateway: Gateway, pd: PagerDutyStandIn) -> None:
    raw = desk_mail("Disk full", message_id="<case-1@helpdesk.example>")
    assert gateway.ingest(raw)[0] == EX_OK
    code, out = gateway.ingest(raw)
    assert code == EX_OK and "duplicate of 1" in out
    assert events(pd) == [("trigger", "Disk full")]
    assert counts(gateway.store)["duplicates"] == 1


def _html_only(subject: str, status: str, encoding: str) -> bytes:
    html = (
        "<html><body><table><tr><td><b>Case #29</b></td></tr>"
        f"<tr><td>Status: {status}</td></tr><tr><td>Priority:&nbsp;5 – “urgent”</td></tr>"
        "</table></body></html>"
    )
    body = html.encode("windows-1252")
    if encoding == "base64":
        payload = base64.encodebytes(body)
    elif encoding == "quoted-printable":
        payload = quopri.encodestring(body)
    else:
        payload = body
    headers = (
        f"From: Desk <desk@helpdesk.example>\r\nTo: desk@gateway.example\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=iso-8859-1\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    return headers.encode() + payload


@pytest.mark.parametrize("encoding", ["base64", "quoted-printable", "8bit"])
def test_html_only_encoded_windows_1252_mail_matches(
    gateway: Gateway, pd: PagerDutyStandIn, encoding: str
) -> None:
    gateway.ingest(_html_only(f"HTML case {encoding}", "New", encoding))
    assert events(pd) == [("trigger", f"HTML case {encoding}")]


@pytest.mark.parametrize(
    ("headers", "sender"),
    [
        pytest.param("Auto-Submitted: auto-replied\r\n", None, id="auto-submitted"),
        pytest.param("X-Autoreply: yes\r\n", None, id="x-autoreply"),
        pytest.param("", "", id="bounce-null-sender"),
    ],
)
def test_loop_guard_records_and_does_not_act(
    gateway: Gateway, pd: PagerDutyStandIn, headers: str, sender: str | None
) -> None:
    raw = headers.encode() + desk_mail("Out of office: Printer")
    extra = ("--sender", sender) if sender is not None else ()
    code, _ = gateway.ingest(raw, *extra)
    assert code == EX_OK
    [job] = gateway.store.jobs()
    assert job.outcome == "loop_ignored" and job.reason.startswith("loop guard:")
    assert pd.requests == []


def test_unmatched_mail_is_kept_and_listed_with_reason(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    gateway.ingest(b"Subject: lunch?\r\nFrom: bob@example.com\r\n\r\nPizza at noon.\r\n")
    code, out = gateway("messages", "--outcome", "unmatched")
    assert code == EX_OK
    assert "unmatched" in out and "no rule matched" in out
    [job] = gateway.store.jobs()
    assert gateway.store.raw_message(job.message).endswith(b"Pizza at noon.\r\n")
    assert pd.requests == []


def test_pagerduty_down_then_up_delivers_once_in_order(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(100, 500)
    gateway.ingest(desk_mail("Outage"))
    gateway.ingest(desk_mail("Outage", "Resolved"))
    assert pd.events == []
    _, out = gateway("outbox")
    assert "pending" in out and "HTTP 500" in out
    pd.script.clear()
    store = gateway.store
    store.conn.execute("UPDATE outbox SET next_attempt_at = 0")  # skip the backoff wait
    gateway("outbox", "flush")
    assert events(pd) == [("trigger", "Outage"), ("resolve", "Outage")]
    assert store.outbox(("pending", "dead")) == []


def test_400_becomes_a_dead_letter_and_retry_requeues(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(1, 400)
    gateway.ingest(desk_mail("Bad event"))
    code, out = gateway("outbox")
    assert code == EX_OK and "dead" in out and "HTTP 400" in out
    [dead] = gateway.store.outbox(("dead",))
    code, out = gateway("outbox", "retry", str(dead.id))
    assert code == EX_OK and "re-queued 1" in out
    gateway("outbox", "flush")
    assert events(pd) == [("trigger", "Bad event")]
    assert gateway("outbox", "retry")[0] == EX_USAGE


def test_catastrophic_regex_quarantines_instead_of_hanging(
    tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "evil.toml"
    rules.write_text(
        '[[rule]]\nname = "evil"\n'
        'conditions = [ { field = "body", op = "matches", value = \'(a+)+$\' } ]\n'
        'action = "trigger"\n'
    )
    config = write_config(tmp_path, pd_url=pd.url)
    text = config.read_text().replace('rules = ["helpdesk.toml"]', f'rules = ["{rules}"]')
    text = text.replace('log_format = "human"', 'log_format = "human"\nregex_timeout_seconds = 0.2')
    config.write_text(text)
    gateway = Gateway(config, capsys)
    code, out = gateway.ingest(b"Subject: x\r\n\r\n" + b"a" * 50_000 + b"!\r\n")
    assert code == EX_OK and "quarantined" in out
    [job] = gateway.store.jobs()
    assert job.outcome == "quarantined" and "timed out" in job.reason
    assert pd.requests == []


def test_embedded_default_keeps_incidents_locally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = Gateway(write_config(tmp_path, routing_key=None), capsys)
    gateway.ingest(desk_mail("No account yet"))
    [incident] = gateway.store.incidents()
    assert incident.state == "triggered"
    assert gateway.store.outbox() == []
    assert [e["kind"] for e in gateway.store.events()] == ["would_send"]


def test_broken_rule_file_makes_check_name_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "broken.toml"
    rules.write_text(
        '[[rule]]\nname = "x"\nconditions = [\n  { field = "body", op = "containz", value = "a" },\n]\naction = "trigger"\n'
    )
    config = write_config(tmp_path)
    config.write_text(
        config.read_text().replace('rules = ["helpdesk.toml"]', f'rules = ["{rules}"]')
    )
    code, out = Gateway(config, capsys)("check")
    assert code == EX_USAGE
    assert f"{rules}:4:" in out and "containz" in out


def test_check_accepts_the_shipped_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = Gateway(write_config(tmp_path), capsys)("check")
    assert code == EX_OK and out.startswith("OK:")


def test_ingest_exits_75_when_the_store_cannot_commit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    (tmp_path / "data").write_text("not a directory")  # the data dir cannot be created
    code, out = Gateway(config, capsys).ingest(desk_mail("x"))
    assert code == EX_TEMPFAIL and "error:" in out


def test_test_rules_prints_the_decision_without_sending(
    gateway: Gateway, pd: PagerDutyStandIn
) -> None:
    path = gateway.config.parent / "mail.eml"
    path.write_bytes(desk_mail("Fwd: RE: Printer on fire"))
    code, out = gateway("test-rules", str(path))
    assert code == EX_OK
    assert "rule:     new case" in out and "key:      Printer on fire" in out
    assert "detail:   case = 29" in out
    assert pd.requests == [] and not (gateway.config.parent / "data").exists()


def test_a_rule_file_shared_by_two_services_is_reported_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "shared.toml"
    rules.write_text(
        '[[rule]]\nname = "x"\nconditions = [ { op = "sometimes" } ]\naction = "trigger"\n'
    )
    second = f'\n[[service]]\nname = "ops"\naddresses = ["ops@*"]\nrules = ["{rules}"]\n'
    config = write_config(tmp_path, extra=second)
    config.write_text(
        config.read_text().replace('rules = ["helpdesk.toml"]', f'rules = ["{rules}"]')
    )
    code, out = Gateway(config, capsys)("check")
    assert code == EX_USAGE
    assert out.count("sometimes") == 1, out


def test_check_needs_templates_only_when_something_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("templates_dir =", "# templates_dir ="))
    assert Gateway(config, capsys)("check")[0] == EX_OK  # no notify: templates are optional
    notify = 'notify = { theme = "incident_update", to = ["agents@helpdesk.example"] }'
    relay = '[outgoing]\nhost = "127.0.0.1"\n'
    config.write_text(
        config.read_text().replace(
            'rules = ["helpdesk.toml"]', f'rules = ["helpdesk.toml"]\n{notify}'
        )
        + relay
    )
    code, out = Gateway(config, capsys)("check")
    assert code == EX_USAGE and "templates directory not found" in out
