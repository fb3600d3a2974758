"""Sender authenticity (issue 15 item 5): a spoofed mail can neither page nor resolve.

Mails are signed here with a test key (dkimpy); a resolver serving the public key stands in for
DNS, so no real DNS is ever asked.
"""

from __future__ import annotations

import base64
import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import AuthSettings, PagerDutySettings, ServiceSettings, load_config
from gateway.decide.evaluation import AUTH_RETRY_DELAYS
from gateway.decide.processor import Processor, load_services
from gateway.decide.replay import replay
from gateway.errors import ConfigError, RuleError
from gateway.intake.spool import incoming
from gateway.mail.authenticity import (
    DnsFailure,
    DnsTxtResolver,
    organisational_domain,
    trusted_results,
    verify,
)
from gateway.outcomes import NON_ACTIONS, Outcome
from gateway.rules import load_ruleset
from gateway.store import Store, open_store
from tests.cli_support import Cli
from tests.conftest import RULES_DIR, GatewayProcess, desk_mail, write_config
from tests.net import free_port
from tests.pdserver import PagerDutyStandIn

SELECTOR = b"gw2026"
HELPDESK = "helpdesk.example"


class Keys:
    """A signing key per domain, and the resolver that serves their public halves."""

    def __init__(self) -> None:
        self.private: dict[str, bytes] = {}
        self.records: dict[str, bytes] = {}
        self.failing = False  # every lookup raises DnsFailure (a DNS outage)
        self.asked: list[str] = []

    def add(self, domain: str) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.private[domain] = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        name = f"{SELECTOR.decode()}._domainkey.{domain}"
        self.records[name] = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def sign(self, raw: bytes, domain: str) -> bytes:
        headers = [b"from", b"to", b"subject", b"message-id"]
        signature = dkim.sign(
            raw, SELECTOR, domain.encode(), self.private[domain], include_headers=headers
        )
        return signature + raw

    def __call__(self, name: str, timeout: float) -> bytes | None:
        self.asked.append(name)
        if self.failing:
            raise DnsFailure("Timeout: the DNS operation timed out")
        return self.records.get(name)


@pytest.fixture(scope="module")
def keys() -> Keys:
    keys = Keys()
    for domain in (HELPDESK, "evil.example"):
        keys.add(domain)
    keys.records[f"_dmarc.{HELPDESK}"] = b"v=DMARC1; p=reject"
    return keys


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "gateway.sqlite3")
    yield store
    store.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def service(**auth: object) -> ServiceSettings:
    return ServiceSettings(
        "helpdesk",
        ("desk@*",),
        (RULES_DIR / "helpdesk.toml",),
        "R" * 32,
        authentication=AuthSettings(**auth),  # type: ignore[arg-type]
    )


def processor(store: Store, settings: ServiceSettings, resolver, clock=None) -> Processor:
    return Processor(
        store,
        load_services((settings,)),
        PagerDutySettings(),
        resolver=resolver,
        clock=clock or Clock(),
    )


def deliver(store: Store, *mails: bytes) -> None:
    store.accept([incoming(m, source="smtp", services=("helpdesk",)) for m in mails])


def signed(keys: Keys, subject: str, domain: str = HELPDESK, **kw: object) -> bytes:
    return keys.sign(desk_mail(subject, **kw), domain)  # type: ignore[arg-type]


# -- verify: DKIM in-process ---------------------------------------------------------------------


def test_dkim_signature_of_an_allowed_domain_lets_the_mail_page(keys: Keys, store: Store) -> None:
    deliver(store, signed(keys, "Printer on fire"))
    settings = service(require="verify", dkim_domains=(HELPDESK,))
    [done] = processor(store, settings, keys).process_pending()
    assert done.outcome == Outcome.TRIGGERED
    assert [i.incident_key for i in store.incidents()] == ["Printer on fire"]


def test_spoofed_or_tampered_mail_is_kept_unauthenticated_and_not_acted_on(
    keys: Keys, store: Store
) -> None:
    """Unsigned, signed by the attacker's own domain, or altered after signing: none pages."""
    tampered = signed(keys, "Printer on fire").replace(b"Priority: 5", b"Priority: 1")
    deliver(
        store,
        desk_mail("Unsigned"),
        signed(keys, "Own key", domain="evil.example"),
        tampered,
    )
    settings = service(require="verify", dkim_domains=(HELPDESK,))
    unsigned, own_key, altered = processor(store, settings, keys).process_pending()
    assert {o.outcome for o in (unsigned, own_key, altered)} == {Outcome.UNAUTHENTICATED}
    assert Outcome.UNAUTHENTICATED in NON_ACTIONS
    assert "dkim=none" in unsigned.reason and "no signature" in unsigned.reason
    assert "dkim=pass (d=evil.example)" in own_key.reason
    assert "dkim=fail" in altered.reason and "fail (d=helpdesk.example)" in altered.reason
    assert store.incidents() == [] and store.outbox() == []
    assert len(store.jobs(outcomes=[Outcome.UNAUTHENTICATED])) == 3


def test_resolve_from_a_spoofed_sender_does_not_resolve(keys: Keys, store: Store) -> None:
    deliver(store, signed(keys, "VPN down"))
    settings = service(require="verify", dkim_domains=(HELPDESK,))
    worker = processor(store, settings, keys)
    worker.process_pending()
    deliver(store, desk_mail("VPN down", status="Resolved"))
    [spoofed] = worker.process_pending()
    assert spoofed.outcome == Outcome.UNAUTHENTICATED
    assert [i.state for i in store.incidents()] == ["triggered"]


def test_dns_failure_is_retried_later_never_a_pass(keys: Keys, store: Store) -> None:
    """temperror: the job stays pending and is tried again on a schedule; when DNS answers
    again it is decided normally; a lasting failure ends as `unauthenticated`."""
    deliver(store, signed(keys, "Disk full"), signed(keys, "Fan noise"))
    clock = Clock()
    outage = Keys()
    outage.records, outage.failing = keys.records, True
    worker = processor(store, service(require="verify", dkim_domains=(HELPDESK,)), outage, clock)
    assert worker.process_pending() == []  # both wait: nothing decided, nothing sent
    assert len(store.pending_jobs()) == 2 and store.outbox() == []
    asked = len(outage.asked)
    assert worker.process_pending() == [] and len(outage.asked) == asked  # not before their time
    clock.now += AUTH_RETRY_DELAYS[0]
    outage.failing = False
    decided = worker.process_pending()
    assert [o.outcome for o in decided] == [Outcome.TRIGGERED, Outcome.TRIGGERED]

    deliver(store, signed(keys, "Still failing"))
    outage.failing = True
    for delay in AUTH_RETRY_DELAYS:
        assert worker.process_pending() == []
        clock.now += delay
    [gave_up] = worker.process_pending()
    assert gave_up.outcome == Outcome.UNAUTHENTICATED
    assert "temperror" in gave_up.reason and "DNS still failing" in gave_up.reason


def test_slow_dns_postpones_other_sender_checks_instead_of_holding_up_every_service(
    keys: Keys, store: Store
) -> None:
    """Each lookup takes 2 s (a fake clock); after 5 s of DNS waiting in one batch the
    remaining `verify` jobs wait for the next batch, unasked and undecided, while another
    service's mail in the same batch is decided at once."""
    clock = Clock()
    asked: list[str] = []

    def slow(name: str, timeout: float) -> bytes | None:
        asked.append(name)
        clock.now += 2.0
        return keys(name, timeout)

    deliver(store, *(signed(keys, f"Outage {n}") for n in range(5)))
    store.accept([incoming(desk_mail("Other service"), source="smtp", services=("other",))])
    verifying = service(require="verify", dkim_domains=(HELPDESK,))
    other = ServiceSettings("other", ("other@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
    worker = Processor(
        store,
        load_services((verifying, other)),
        PagerDutySettings(),
        resolver=slow,
        clock=clock,
        dns_budget=5.0,
    )
    first = worker.process_pending()
    assert [(o.service, o.outcome) for o in first] == [
        ("helpdesk", Outcome.TRIGGERED),
        ("helpdesk", Outcome.TRIGGERED),
        ("other", Outcome.TRIGGERED),
    ]
    assert len(asked) == 4  # key + DMARC record for each of the two mails checked
    assert len(store.pending_jobs()) == 3 and worker.postponed == 3
    assert len(worker.process_pending()) == 2  # the next batch: a new budget, no retry delay
    assert [o.outcome for o in worker.process_pending()] == [Outcome.TRIGGERED]
    assert store.pending_jobs() == [] and len(asked) == 10


def test_a_restart_during_a_dns_outage_never_turns_the_wait_into_a_pass(
    keys: Keys, tmp_path: Path
) -> None:
    """Retry state is in memory: each restart (a new processor on the same database) tries
    the waiting jobs again at once. While DNS fails they stay pending, however often the
    gateway restarts; when it answers, the genuine mail pages and the forged one does not."""
    path = tmp_path / "gateway.sqlite3"
    outage = Keys()
    outage.records, outage.failing = keys.records, True
    forged = signed(keys, "Forged").replace(b"Priority: 5", b"Priority: 1")
    settings = service(require="verify", dkim_domains=(HELPDESK,), from_domains=(HELPDESK,))
    store = open_store(path)
    deliver(store, signed(keys, "Genuine"), forged)
    store.close()
    for restart in range(len(AUTH_RETRY_DELAYS) + 2):
        store = open_store(path)
        try:
            worker = processor(store, settings, outage)
            assert worker.process_pending() == [], f"decided after restart {restart}"
            assert len(store.pending_jobs()) == 2
            assert store.outbox() == [] and store.incidents() == []
        finally:
            store.close()
    outage.failing = False
    store = open_store(path)
    try:
        genuine, spoofed = processor(store, settings, outage).process_pending()
        assert genuine.outcome == Outcome.TRIGGERED
        assert spoofed.outcome == Outcome.UNAUTHENTICATED and "dkim=fail" in spoofed.reason
    finally:
        store.close()


def test_a_dns_failure_for_one_signature_is_retried_even_when_another_passes(
    keys: Keys, store: Store
) -> None:
    """Signed by the attacker's domain (which resolves) and by the helpdesk (whose key lookup
    fails): the best DKIM result reads `pass`, but the verdict is not settled: retried, not
    refused for good; when DNS answers, the helpdesk's signature lets it page."""
    clock = Clock()
    key_name = f"{SELECTOR.decode()}._domainkey.{HELPDESK}"
    down = [True]

    def partial_outage(name: str, timeout: float) -> bytes | None:
        if down[0] and name == key_name:
            raise DnsFailure("Timeout")
        return keys(name, timeout)

    deliver(store, keys.sign(signed(keys, "Two signatures"), "evil.example"))
    settings = service(require="verify", dkim_domains=(HELPDESK,))
    worker = processor(store, settings, partial_outage, clock)
    assert worker.process_pending() == [] and len(store.pending_jobs()) == 1
    down[0] = False
    clock.now += AUTH_RETRY_DELAYS[0]
    [done] = worker.process_pending()
    assert done.outcome == Outcome.TRIGGERED


def test_dmarc_pass_for_an_allowed_from_domain(keys: Keys) -> None:
    results = verify(signed(keys, "x"), keys, 1.0)
    assert (results.dkim, results.dmarc, results.dmarc_domain) == ("pass", "pass", HELPDESK)
    foreign = verify(signed(keys, "x", domain="evil.example"), keys, 1.0)
    assert (foreign.dkim, foreign.dmarc) == ("pass", "fail")  # signed, but not aligned
    nothing = verify(desk_mail("x", sender="a@other.example"), keys, 1.0)
    assert (nothing.dkim, nothing.dmarc) == ("none", "none")  # no record for other.example


def test_dmarc_alignment_under_a_multi_label_public_suffix() -> None:
    """co.uk is a public suffix: the organisational domain of mail.example.co.uk is
    example.co.uk (not co.uk), where its DMARC policy is found and its subdomains align;
    another registrant under co.uk, or a signer that is the suffix itself, never aligns."""
    keys = Keys()
    for domain in ("example.co.uk", "alerts.example.co.uk", "other.co.uk", "co.uk"):
        keys.add(domain)
    keys.records["_dmarc.example.co.uk"] = b"v=DMARC1; p=reject"
    keys.records["_dmarc.co.uk"] = b"v=DMARC1; p=none"  # a suffix's record is never asked

    def judged(sender: str, signer: str) -> tuple[str, str, str]:
        result = verify(keys.sign(desk_mail("x", sender=sender), signer), keys, 1.0)
        return result.dkim, result.dmarc, result.dmarc_domain

    sub = "x@mail.example.co.uk"
    assert judged(sub, "example.co.uk") == ("pass", "pass", "mail.example.co.uk")
    assert judged(sub, "alerts.example.co.uk") == ("pass", "pass", "mail.example.co.uk")
    assert judged("x@example.co.uk", "alerts.example.co.uk")[1] == "pass"
    assert judged(sub, "other.co.uk")[:2] == ("pass", "fail")
    assert judged("x@example.co.uk", "co.uk")[:2] == ("pass", "fail")
    assert "_dmarc.co.uk" not in keys.asked and "_dmarc.example.co.uk" in keys.asked
    assert organisational_domain("shop.example.com.au") == "example.com.au"
    assert organisational_domain("co.uk") == ""


def test_verify_mode_with_allowed_from_domain(keys: Keys, store: Store) -> None:
    deliver(store, signed(keys, "Aligned"), signed(keys, "Foreign signer", domain="evil.example"))
    settings = service(require="verify", from_domains=(HELPDESK,))
    aligned, foreign = processor(store, settings, keys).process_pending()
    assert aligned.outcome == Outcome.TRIGGERED
    assert foreign.outcome == Outcome.UNAUTHENTICATED and "dmarc=fail" in foreign.reason


# -- trusted_header: Authentication-Results of one named MTA -------------------------------------

TRUSTED = "mx.gateway.example"


def stamped(authserv_id: str, verdicts: str, raw: bytes) -> bytes:
    return f"Authentication-Results: {authserv_id}; {verdicts}\r\n".encode() + raw


def test_only_the_trusted_mtas_authentication_results_count(store: Store) -> None:
    good = f"dkim=pass header.d={HELPDESK}; spf=pass smtp.mailfrom={HELPDESK}"
    deliver(
        store,
        stamped(TRUSTED, good, desk_mail("Trusted pass")),
        stamped("mx.evil.example", good, desk_mail("Forged by the sender")),
        # the forged header sits below the trusted MTA's own: the topmost of its id counts
        stamped(
            TRUSTED,
            "dkim=fail header.d=helpdesk.example",
            stamped(TRUSTED, good, desk_mail("Buried")),
        ),
    )
    settings = service(require="trusted_header", authserv_id=TRUSTED, dkim_domains=(HELPDESK,))
    trusted, untrusted, buried = processor(store, settings, None).process_pending()
    assert trusted.outcome == Outcome.TRIGGERED
    assert untrusted.outcome == Outcome.UNAUTHENTICATED
    assert f"no Authentication-Results header of {TRUSTED}" in untrusted.reason
    assert buried.outcome == Outcome.UNAUTHENTICATED and "dkim=fail" in buried.reason


def test_trusted_header_results_are_parsed_with_authres() -> None:
    raw = stamped(
        "MX.Gateway.Example",
        f"dkim=fail header.d=x.example; dkim=pass header.d={HELPDESK}; spf=softfail"
        f" smtp.mailfrom=b.example; dmarc=pass (p=reject) header.from={HELPDESK}",
        desk_mail("x"),
    )
    results = trusted_results(raw, TRUSTED)
    assert results.fields() == {
        "auth.dkim": "pass",
        "auth.spf": "softfail",
        "auth.dmarc": "pass",
        "auth.dkim_domain": HELPDESK,
    }
    assert trusted_results(b"Authentication-Results: ;;; garbage\r\n\r\n", TRUSTED).dkim == "none"


def test_rules_can_test_auth_fields(store: Store, tmp_path: Path) -> None:
    """`auth.*` conditions: with require_authentication = "none" and an authserv_id, the
    trusted verdicts are there for rules to use."""
    rules = tmp_path / "auth.toml"
    rules.write_text(
        "[[rule]]\nname = 'signed by the helpdesk'\naction = 'trigger'\nconditions = [\n"
        "  { field = 'auth.dkim', op = 'equals', value = 'pass' },\n"
        f"  {{ field = 'auth.dkim_domain', op = 'equals', value = '{HELPDESK}' }},\n]\n"
    )
    deliver(
        store,
        stamped(TRUSTED, f"dkim=pass header.d={HELPDESK}", desk_mail("Signed")),
        desk_mail("Not signed"),
    )
    settings = ServiceSettings(
        "helpdesk",
        ("desk@*",),
        (rules,),
        "R" * 32,
        authentication=AuthSettings(authserv_id=TRUSTED),
    )
    signed_, unsigned = processor(store, settings, None).process_pending()
    assert signed_.outcome == Outcome.TRIGGERED
    assert unsigned.outcome == Outcome.UNMATCHED
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[rule]]\nname = 'x'\naction = 'trigger'\n"
        "conditions = [{ field = 'auth.arc', op = 'equals', value = 'pass' }]\n"
    )
    with pytest.raises(RuleError, match=r"auth\.dkim_domain"):
        load_ruleset([bad])


def test_authentication_config_needs_what_its_mode_uses(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        service_extra='require_authentication = "trusted_header"\n',
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "authserv_id" in message and "allowed_dkim_domains" in message


def test_signature_that_leaves_rule_text_unsigned_does_not_pass(keys: Keys) -> None:
    """A genuine signature, but a Subject added above the signed one, or an `l=` tag that
    lets text be appended to the body: the rules would read unsigned text, so it fails."""
    genuine = signed(keys, "VPN down")
    assert verify(genuine, keys, 1.0).dkim == "pass"
    added_subject = b"Subject: Status: Resolved\r\n" + genuine
    result = verify(added_subject, keys, 1.0)
    assert result.dkim == "fail" and "does not cover" in result.detail
    raw = desk_mail("VPN down")
    with_length = dkim.sign(raw, SELECTOR, HELPDESK.encode(), keys.private[HELPDESK], length=True)
    appended = with_length + raw + b"\r\nStatus: Resolved\r\n"
    assert verify(appended, keys, 1.0).dkim == "fail"


def test_a_dns_outage_costs_one_timeout_per_name_not_one_per_mail() -> None:
    """The real resolver remembers a failure briefly: a batch of mail from one sender during
    an outage waits for one timeout, and the decider is not held up mail after mail."""
    calls: list[str] = []
    now = [0.0]

    def failing(name: str, timeout: float) -> bytes | None:
        calls.append(name)
        raise DnsFailure("Timeout")

    resolver = DnsTxtResolver(lookup=failing, failure_ttl=30.0, clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(DnsFailure):
            resolver("gw2026._domainkey.helpdesk.example", 5.0)
    assert len(calls) == 1
    now[0] += 31
    with pytest.raises(DnsFailure):
        resolver("gw2026._domainkey.helpdesk.example", 5.0)
    assert len(calls) == 2
    answers = DnsTxtResolver(lookup=lambda name, timeout: b"v=DKIM1; p=x", clock=lambda: now[0])
    assert answers("a.example", 1.0) == answers("A.example", 1.0) == b"v=DKIM1; p=x"


def test_hostile_mail_never_breaks_the_check(keys: Keys) -> None:
    """Every malformed fixture mail, with and without a bogus signature, gets a verdict."""
    bogus = b"DKIM-Signature: v=1; a=rsa-sha256; d=helpdesk.example; s=x; h=from; bh=; b=\r\n"
    for path in sorted((Path(__file__).parent / "fixtures" / "mail").glob("*.eml")):
        for raw in (path.read_bytes(), bogus + path.read_bytes()):
            results = verify(raw, keys, 1.0)
            assert results.dkim in ("none", "permerror", "fail"), path.name
            assert trusted_results(raw, TRUSTED).dkim == "none"


def test_replay_keeps_the_sender_check(keys: Keys, store: Store) -> None:
    """Replay shows no phantom change: trusted_header is re-read from the mail, a verify
    verdict stands as stored (today's DNS says nothing about yesterday's mail)."""
    good = f"dkim=pass header.d={HELPDESK}"
    deliver(
        store,
        stamped(TRUSTED, good, desk_mail("Trusted")),
        stamped("mx.evil.example", good, desk_mail("Forged")),
    )
    settings = service(require="trusted_header", authserv_id=TRUSTED, dkim_domains=(HELPDESK,))
    processor(store, settings, None).process_pending()
    replayed = replay(store, load_services((settings,)), since=0)
    assert [r.new.kind for r in replayed] == ["trigger", Outcome.UNAUTHENTICATED]
    assert not any(r.changed for r in replayed)

    verify_settings = service(require="verify", dkim_domains=(HELPDESK,))
    deliver(store, signed(keys, "Signed"), desk_mail("Unsigned"))
    processor(store, verify_settings, keys).process_pending()
    replayed = replay(store, load_services((verify_settings,)), since=0)
    assert [r.new.kind for r in replayed][-2:] == ["trigger", Outcome.UNAUTHENTICATED]
    assert not any(r.changed for r in replayed[-2:])


def test_served_gateway_pages_only_for_the_trusted_verdict(
    tmp_path: Path, pd: PagerDutyStandIn, capsys, monkeypatch
) -> None:
    """End to end: real SMTP into `gateway serve`, the PagerDuty stand-in, the CLI listing."""
    port = free_port()
    auth = (
        f'require_authentication = "trusted_header"\nauthserv_id = "{TRUSTED}"\n'
        f'allowed_dkim_domains = ["{HELPDESK}"]\n'
    )
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port, service_extra=auth)
    gateway = GatewayProcess(config, port).start()
    try:
        good = f"dkim=pass header.d={HELPDESK}"
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            for raw in (
                stamped("mx.evil.example", good, desk_mail("Forged outage")),
                stamped(TRUSTED, good, desk_mail("Real outage")),
            ):
                client.sendmail("support@helpdesk.example", ["desk@gateway.example"], raw)
        [event] = pd.wait_for(1)
        assert (event["event_action"], event["dedup_key"]) == ("trigger", "Real outage")
        listed = Cli(config, capsys, monkeypatch)(
            "messages", "--outcome", "unauthenticated", "--json"
        )
        [kept] = [json.loads(line) for line in listed.out.splitlines()]
        assert kept["subject"] == "Forged outage"
        assert f"no Authentication-Results header of {TRUSTED}" in kept["reason"]
    finally:
        gateway.stop()
    assert len(pd.events) == 1


def test_a_trusted_headers_temperror_is_decided_at_once(store: Store) -> None:
    """The upstream MTA's `dkim=temperror` will read the same tomorrow: no retry, kept now."""
    deliver(store, stamped(TRUSTED, "dkim=temperror header.d=helpdesk.example", desk_mail("x")))
    settings = service(require="trusted_header", authserv_id=TRUSTED, dkim_domains=(HELPDESK,))
    [done] = processor(store, settings, None).process_pending()
    assert done.outcome == Outcome.UNAUTHENTICATED and "dkim=temperror" in done.reason


def test_test_rules_shows_the_sender_check_and_why_a_mail_would_be_unauthenticated(
    keys: Keys, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`gateway test-rules` judges the service's sender check as the server would: a
    trusted_header verdict from the mail itself; `verify` only with --dns (here the test
    resolver), else it says it did not check; the rules see the same `auth.*` fields."""
    mails = {
        "forged.eml": stamped("mx.evil.example", f"dkim=pass header.d={HELPDESK}", desk_mail("F")),
        "trusted.eml": stamped(TRUSTED, f"dkim=pass header.d={HELPDESK}", desk_mail("T")),
        "signed.eml": signed(keys, "Signed"),
        "unsigned.eml": desk_mail("Unsigned"),
    }
    for name, raw in mails.items():
        (tmp_path / name).write_bytes(raw)

    def run(mode: str, name: str, *extra: str) -> tuple[str, dict]:
        auth = (
            f'require_authentication = "{mode}"\nauthserv_id = "{TRUSTED}"\n'
            f'allowed_dkim_domains = ["{HELPDESK}"]\n'
        )
        directory = tmp_path / mode
        directory.mkdir(exist_ok=True)
        cli = Cli(write_config(directory, service_extra=auth), capsys, monkeypatch)
        mail = str(tmp_path / name)
        text = cli("test-rules", mail, *extra)
        shown = cli("test-rules", mail, "--json", *extra)
        assert text.code == shown.code == 0, text.err + shown.err
        return text.out, json.loads(shown.out)["auth"]

    out, auth = run("trusted_header", "forged.eml")
    assert "unauthenticated" in out and f"no Authentication-Results header of {TRUSTED}" in out
    assert auth["checked"] and auth["passed"] is False and "unauthenticated" in auth["reason"]
    out, auth = run("trusted_header", "trusted.eml")
    assert "auth:     passes" in out and "dkim=pass" in out
    assert auth["passed"] is True and auth["fields"]["auth.dkim_domain"] == HELPDESK

    out, auth = run("verify", "signed.eml")
    assert "not checked offline" in out and "--dns" in out
    assert auth["checked"] is False and auth["passed"] is None
    monkeypatch.setattr("gateway.cli.rules_cmd.DnsTxtResolver", lambda: keys)
    out, auth = run("verify", "signed.eml", "--dns")
    assert auth["passed"] is True and auth["fields"]["auth.dkim"] == "pass"
    out, auth = run("verify", "unsigned.eml", "--dns")
    assert "unauthenticated" in out and "dkim=none" in out and auth["passed"] is False
