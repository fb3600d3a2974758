"""`allowed_senders` for every intake: strict addresses at SMTP RCPT, the header From and the
Return-Path at decision time, and mail fetched over IMAP held to the same rule."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import PagerDutySettings, ServiceSettings, load_config
from gateway.decide.processor import Processor, load_services
from gateway.decide.replay import replay
from gateway.decide.senders import sender_refusal
from gateway.errors import ConfigError
from gateway.intake.smtp_handler import REPLY_SENDER_NOT_ALLOWED
from gateway.intake.spool import incoming
from gateway.outcomes import NON_ACTIONS, Outcome
from gateway.store import Store, open_store
from tests.conftest import ROOT, RULES_DIR, desk_mail, write_config
from tests.dovecot import PASSWORD, USER, Dovecot, require_dovecot
from tests.pdserver import PagerDutyStandIn
from tests.test_smtp import S250_OK, FakeSpool, Wire, listening, port_of, run, settings

TRUSTED = ("*@helpdesk.example",)
GOOD = "support@helpdesk.example"
EVIL = "mallory@evil.example"


def service(check: str = "envelope", allowed: tuple[str, ...] = TRUSTED) -> ServiceSettings:
    return ServiceSettings(
        "helpdesk",
        ("desk@*",),
        (RULES_DIR / "helpdesk.toml",),
        "R" * 32,
        allowed_senders=allowed,
        allowed_senders_check=check,
    )


def mail(subject: str = "Printer on fire", *, sender: str = GOOD, return_path: str = "") -> bytes:
    raw = desk_mail(subject, sender=sender)
    return (f"Return-Path: {return_path}\r\n".encode() + raw) if return_path else raw


# -- SMTP: the envelope at RCPT, parsed strictly ------------------------------------------------


def test_quoted_local_part_cannot_smuggle_a_sender_past_rcpt() -> None:
    """`<"x@evil.example"@helpdesk.example>` ends in an allowed domain, but is not one plain
    address of it: refused at RCPT like any other disallowed sender."""

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            for path in (
                '<"x@evil.example"@helpdesk.example>',
                "<@helpdesk.example:x@evil.example>",
            ):
                assert (await wire.cmd(f"MAIL FROM:{path}")).code == S250_OK
                refused = await wire.cmd("RCPT TO:<ops@alerts.example>")  # allowed: *@helpdesk
                assert str(refused) == REPLY_SENDER_NOT_ALLOWED.format(address="ops@alerts.example")
                assert (await wire.cmd("RSET")).code == S250_OK
            assert (await wire.cmd("MAIL FROM:<a@helpdesk.example>")).code == S250_OK
            assert (await wire.cmd("RCPT TO:<ops@alerts.example>")).code == S250_OK
            await wire.close()

    run(scenario)


# -- the decision-time check (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "raw", "mail_from", "refused_with"),
    [
        pytest.param("envelope", mail(sender=EVIL), GOOD, None, id="envelope-ignores-from"),
        pytest.param("header", mail(sender=EVIL), GOOD, f"header From <{EVIL}>", id="header"),
        pytest.param("header", mail(), EVIL, None, id="header-ignores-envelope"),
        pytest.param("both", mail(), EVIL, f"envelope sender <{EVIL}>", id="both-envelope"),
        pytest.param("both", mail(sender=EVIL), GOOD, f"header From <{EVIL}>", id="both-header"),
        pytest.param("both", mail(), GOOD, None, id="both-pass"),
        pytest.param(
            "envelope",
            mail(return_path=f"<{EVIL}>"),
            None,
            f"envelope sender <{EVIL}> (Return-Path)",
            id="imap-return-path",
        ),
        pytest.param(
            "envelope", mail(return_path=f"<{GOOD}>"), None, None, id="imap-return-path-ok"
        ),
        pytest.param("envelope", mail(), None, "no Return-Path", id="imap-no-return-path"),
        pytest.param(
            "envelope",
            mail(return_path='<"x@evil.example"@helpdesk.example>'),
            None,
            "is not one plain address",
            id="imap-quoted-return-path",
        ),
        pytest.param("envelope", mail(), "", "envelope sender <>", id="null-sender"),
        pytest.param(
            "header",
            b"From: a@helpdesk.example, b@evil.example\r\nSubject: x\r\n\r\nStatus: New\r\n",
            GOOD,
            "is not one plain address",
            id="two-from-addresses",
        ),
        pytest.param(
            "header",
            b"From: a@helpdesk.example\r\nFrom: b@evil.example\r\n\r\nStatus: New\r\n",
            GOOD,
            "is not one plain address",
            id="two-from-headers",
        ),
        pytest.param(
            "header",
            b'From: "a@helpdesk.example" <x@evil.example>\r\n\r\nStatus: New\r\n',
            GOOD,
            "header From <x@evil.example>",
            id="display-name-is-not-the-address",
        ),
        pytest.param(
            "header",
            b"From: =?utf-8?q?Doe=2C_Jane?= <jane@helpdesk.example>\r\n\r\nx\r\n",
            GOOD,
            None,
            id="encoded-display-name",
        ),
        pytest.param("header", b"Subject: x\r\n\r\nx\r\n", GOOD, "no From", id="no-from"),
    ],
)
def test_sender_refusal(
    check: str, raw: bytes, mail_from: str | None, refused_with: str | None
) -> None:
    reason = sender_refusal(service(check), raw, mail_from)
    if refused_with is None:
        assert reason is None
    else:
        assert reason is not None and refused_with in reason, reason
        assert f'allowed_senders_check = "{check}"' in reason


def test_no_allowed_senders_means_no_check() -> None:
    for check in ("envelope", "header", "both"):
        assert sender_refusal(service(check, allowed=()), b"Subject: x\r\n\r\n", None) is None


# -- the processor: refused mail is kept, visible and not acted on ------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "gateway.sqlite3")
    yield store
    store.close()


@pytest.mark.parametrize("check", ["header", "both"])
def test_header_from_outside_allowed_senders_is_kept_and_not_acted_on(
    store: Store, check: str
) -> None:
    store.accept(
        [
            incoming(
                mail("Spoofed", sender=EVIL), source="smtp", services=("helpdesk",), mail_from=GOOD
            ),
            incoming(mail("Genuine"), source="smtp", services=("helpdesk",), mail_from=GOOD),
        ]
    )
    services = load_services((service(check),))
    spoofed, genuine = Processor(store, services, PagerDutySettings()).process_pending()
    assert spoofed.outcome == Outcome.SENDER_REFUSED == "sender_not_allowed"
    assert EVIL in spoofed.reason and f'allowed_senders_check = "{check}"' in spoofed.reason
    assert genuine.outcome == Outcome.TRIGGERED
    assert Outcome.SENDER_REFUSED in NON_ACTIONS
    [kept] = store.jobs(outcomes=[Outcome.SENDER_REFUSED])
    assert kept.message == spoofed.message and EVIL in kept.reason
    assert [i.incident_key for i in store.incidents()] == ["Genuine"]
    assert [item.order_key for item in store.outbox()] == ["pagerduty:helpdesk:Genuine"]
    replayed = replay(store, services, since=0)
    assert [r.new.kind for r in replayed] == [Outcome.SENDER_REFUSED, "trigger"]
    assert not any(r.changed for r in replayed)  # replay applies the same check


def test_header_check_leaves_the_envelope_to_decision_time() -> None:
    """With `allowed_senders_check = "header"` RCPT does not judge the envelope: a helpdesk
    whose bounces come from another domain still gets its mail in, and the From decides."""
    header_only = (service("header"),)

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool, header_only) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            reply = await wire.send_mail(mail("via a relay"), sender="bounces@relay.example")
            assert reply.code == S250_OK
            await wire.close()
        assert spool.mails[0].mail_from == "bounces@relay.example"

    run(scenario)


def test_allowed_senders_check_is_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path, service_extra='allowed_senders = ["*@helpdesk.example"]')
    assert load_config(config).services[0].allowed_senders_check == "envelope"
    config = write_config(
        tmp_path,
        service_extra='allowed_senders = ["*@helpdesk.example"]\nallowed_senders_check = "From"',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "allowed_senders_check" in str(caught.value) and "header" in str(caught.value)


# -- IMAP: the same rule for mail fetched from a mailbox ----------------------------------------


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    require_dovecot()
    directory = tmp_path / "dovecot"
    directory.mkdir()
    server = Dovecot(directory).start()
    try:
        yield server
    finally:
        server.stop()


def test_imap_mail_is_held_to_allowed_senders(tmp_path: Path, dovecot: Dovecot) -> None:
    """`gateway imap-once` against a real Dovecot: the Return-Path (envelope) and the From
    (header) of fetched mail are checked as SMTP's would be; only the genuine mail pages."""
    pd = PagerDutyStandIn().start()
    try:
        imap = (
            f'[[imap]]\nname = "desk"\nhost = "{dovecot.host}"\nport = {dovecot.port}\n'
            f'security = "none"\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
            'service = "helpdesk"\n'
        )
        config = write_config(
            tmp_path,
            pd_url=pd.url,
            service_extra='allowed_senders = ["*@helpdesk.example"]\nallowed_senders_check = "both"',
            extra=imap,
        )
        dovecot.append(mail("Spoofed envelope", return_path=f"<{EVIL}>"))
        dovecot.append(mail("Spoofed From", sender=EVIL, return_path=f"<{GOOD}>"))
        dovecot.append(mail("Genuine", return_path=f"<{GOOD}>"))
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "imap-once", "desk"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "accepted 3 message(s)" in result.stdout
        assert [e["dedup_key"] for e in pd.wait_for(1)] == ["Genuine"]
        store = open_store(config.parent / "data" / "gateway.sqlite3")
        try:
            refused = store.jobs(outcomes=[Outcome.SENDER_REFUSED])
        finally:
            store.close()
        reasons = sorted(j.reason or "" for j in refused)
        assert len(reasons) == 2
        assert f"envelope sender <{EVIL}> (Return-Path)" in reasons[0]
        assert f"header From <{EVIL}>" in reasons[1]
        assert len(pd.events) == 1
    finally:
        pd.stop()
