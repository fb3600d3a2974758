"""Two-way with PagerDuty (issue 14), over real HTTP against `gateway serve`: signed Webhooks v3
deliveries change the incident mirror and tell the helpdesk (through a real SMTP sink as the
`[outgoing]` relay), bad ones change nothing, redeliveries act once, nothing is echoed back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gateway.outcomes import Outcome
from gateway.store import Store
from gateway.themes.render import POLICY
from gateway.web.pagerduty_webhook import sign
from tests.conftest import desk_mail, wait_until
from tests.net import free_port
from tests.ops_support import WebGateway
from tests.pdserver import PagerDutyStandIn
from tests.test_mailer import Sink
from tests.webhook_support import (
    HELPDESK,
    OLD_SECRET,
    SECRETS_ENV,
    event_body,
    note_body,
    post,
    send_mail,
    serving,
    store_of,
    two_way_config,
    wait_for_incident,
)


class Rig:
    """One gateway with its stand-ins, shared by the tests of a class (each uses its own key)."""

    def __init__(self, gateway: WebGateway, pd: PagerDutyStandIn, sink: Sink, store: Store):
        self.gateway, self.pd, self.sink, self.store = gateway, pd, sink, store

    def open_case(self, subject: str) -> str:
        """A Desk.com "new case" mail -> incident triggered in the stand-in; its Message-ID."""
        message_id = f"<case-{abs(hash(subject))}@helpdesk.example>"
        send_mail(self.gateway, desk_mail(subject, "New", message_id=message_id))
        wait_until(
            lambda: any(e["dedup_key"] == subject for e in self.pd.events),
            message=f"no trigger for {subject!r}:\n{self.gateway.output()}",
        )
        wait_for_incident(self.store, subject, state="triggered")
        return message_id

    def mails_about(self, subject: str) -> list:
        return [m for m in self.sink.handler.messages() if subject in str(m["Subject"])]

    def pd_actions(self, key: str) -> list[str]:
        return [e["event_action"] for e in self.pd.events if e.get("dedup_key") == key]


@pytest.fixture(scope="class")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("two-way")
    saved = {name: os.environ.get(name) for name in SECRETS_ENV}
    os.environ.update(SECRETS_ENV)
    pd = PagerDutyStandIn().start()
    sink = Sink(free_port()).start()
    try:
        config, port, web_port = two_way_config(directory, pd.url, sink.port)
        with serving(config, port, web_port) as gateway:
            store = store_of(directory)
            try:
                yield Rig(gateway, pd, sink, store)
            finally:
                store.close()
    finally:
        sink.stop()
        pd.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TestWebhookReceiver:
    def test_a_signed_event_changes_the_mirror(self, rig: Rig) -> None:
        rig.open_case("Printer on fire")
        status, answer = post(rig.gateway, event_body("incident.acknowledged", "Printer on fire"))
        assert status == 202
        # committed before the 2xx: another connection sees it at once, without waiting
        (stored,) = rig.store.pagerduty_events(incident_key="Printer on fire")
        assert answer == f'{{"stored":{stored.id}}}'
        incident = wait_for_incident(rig.store, "Printer on fire", state="acknowledged")
        assert incident.pd_status == "acknowledged"
        assert incident.assignees == "Tenex Engineer"
        assert (incident.priority, incident.urgency) == ("P1", "high")
        assert incident.pd_id.startswith("P") and len(incident.pd_id) == 7
        assert incident.pd_url == f"https://acme.pagerduty.com/incidents/{incident.pd_id}"
        assert incident.changed_by == "pagerduty"

    def test_a_bad_signature_gets_401_and_changes_nothing(self, rig: Rig) -> None:
        rig.open_case("Scanner jammed")
        body = event_body("incident.resolved", "Scanner jammed", status="resolved", pd_id="PBAD")
        answers = [
            post(rig.gateway, body, secret="not-the-secret"),
            post(rig.gateway, body, signature=""),
            post(
                rig.gateway, body.replace(b"Scanner", b"Scammer"), signature=sign(body, OLD_SECRET)
            ),
            post(rig.gateway, body, signature="v1=zz, v0=abc, nonsense"),
            post(rig.gateway, body, signature=sign(body, OLD_SECRET).upper()[:-2]),
        ]
        assert [status for status, _ in answers] == [401] * 5
        assert "X-PagerDuty-Signature" in answers[0][1]
        assert rig.store.pagerduty_events(limit=1000) == [] or all(
            e.pd_incident != "PBAD" for e in rig.store.pagerduty_events(limit=1000)
        )
        incident = rig.store.incident("helpdesk", "Scanner jammed")
        assert incident is not None and incident.state == "triggered" and incident.pd_id == ""
        # the same body, signed right, does change it
        assert post(rig.gateway, body)[0] == 202
        wait_for_incident(rig.store, "Scanner jammed", state="resolved", pd_id="PBAD")

    def test_bad_json_is_400_and_an_oversized_body_413(self, rig: Rig) -> None:
        assert post(rig.gateway, b"{not json")[0] == 400
        assert post(rig.gateway, b'{"event": "nope"}')[0] == 400
        assert post(rig.gateway, b'{"event": {"id": "x"}}')[0] == 400
        big = event_body("incident.annotated", "k")[:-2] + b', "pad": "' + b"x" * 270_000 + b'"}}'
        assert post(rig.gateway, big)[0] == 413
        near = event_body("incident.annotated", "k")[:-2] + b', "pad": "' + b"x" * 200_000 + b'"}}'
        assert post(rig.gateway, near)[0] == 202  # best effort up to 256 KB is honoured

    def test_a_rotation_pair_is_accepted(self, rig: Rig) -> None:
        rig.open_case("Router rebooting")
        body = event_body("incident.acknowledged", "Router rebooting", pd_id="PROT")
        pair = f"v1={'0' * 64},{sign(body, OLD_SECRET)}"
        assert post(rig.gateway, body, signature=pair)[0] == 202
        wait_for_incident(rig.store, "Router rebooting", state="acknowledged", pd_id="PROT")

    def test_a_redelivery_acts_once(self, rig: Rig) -> None:
        rig.open_case("Badge reader dead")
        body = event_body("incident.acknowledged", "Badge reader dead", event_id="EV-1")
        assert post(rig.gateway, body, webhook_id="WH-1")[0] == 202
        assert post(rig.gateway, body, webhook_id="WH-1")[0] == 200  # same X-Webhook-Id
        assert post(rig.gateway, body, webhook_id="WH-2")[0] == 200  # same event.id
        wait_until(lambda: rig.mails_about("Badge reader dead"), message="no notification mail")
        wait_until(
            lambda: rig.store.pending_pagerduty_events() == [], message="events stay pending"
        )
        assert len(rig.mails_about("Badge reader dead")) == 1
        assert len(rig.store.pagerduty_events(incident_key="Badge reader dead")) == 1
        incident = rig.store.incident("helpdesk", "Badge reader dead")
        assert incident is not None and incident.acknowledge_count == 1

    def test_an_unknown_key_is_recorded_and_visible(self, rig: Rig) -> None:
        body = event_body("incident.triggered", "Never sent by us", status="triggered")
        assert post(rig.gateway, body)[0] == 202
        wait_until(
            lambda: (
                [e.outcome for e in rig.store.pagerduty_events(incident_key="Never sent by us")]
                == ["unknown_key"]
            ),
            message=f"unknown key not recorded:\n{rig.gateway.output()[-3000:]}",
        )
        status, page = rig.gateway.get("/")
        assert status == 200 and "Never sent by us" in page and "unknown_key" in page
        assert rig.store.incident("helpdesk", "Never sent by us") is None


class TestTellingTheHelpdesk:
    def test_acknowledged_and_resolved_send_one_threaded_mail_each(self, rig: Rig) -> None:
        case_id = rig.open_case("VPN down in Lisbon")
        post(rig.gateway, event_body("incident.acknowledged", "VPN down in Lisbon"))
        wait_until(lambda: len(rig.mails_about("VPN down in Lisbon")) == 1, message="no ack mail")
        body = event_body("incident.resolved", "VPN down in Lisbon", status="resolved")
        post(rig.gateway, body)
        wait_until(lambda: len(rig.mails_about("VPN down in Lisbon")) == 2, message="no resolve")
        wait_until(lambda: rig.store.pending_pagerduty_events() == [])
        ack, resolved = rig.mails_about("VPN down in Lisbon")
        for mail, event in ((ack, "incident.acknowledged"), (resolved, "incident.resolved")):
            assert mail["In-Reply-To"] == case_id and case_id in mail["References"]
            assert mail["Subject"] == "Re: VPN down in Lisbon"
            assert mail["Auto-Submitted"] == "auto-generated"
            assert mail["X-Gateway-Event"] == event
            assert mail["To"] == HELPDESK
        text = ack.get_body(("plain",)).get_content()
        assert "Tenex Engineer" in text and "https://acme.pagerduty.com/incidents/P" in text
        assert "Case #29" not in text  # the case fields are there, the case body is not copied

    def test_a_note_reaches_the_helpdesk_by_pagerduty_id(self, rig: Rig) -> None:
        rig.open_case("Mail queue stuck")
        body = event_body("incident.acknowledged", "Mail queue stuck", pd_id="PNOTE1")
        post(rig.gateway, body)
        wait_for_incident(rig.store, "Mail queue stuck", pd_id="PNOTE1")
        post(rig.gateway, note_body("PNOTE1", "Restarted the MTA, watching it."))
        mail = wait_until(
            lambda: [m for m in rig.mails_about("Mail queue stuck")
                     if m["X-Gateway-Event"] == "incident.annotated"],
            message="no note mail",
        )[0]  # fmt: skip
        assert "Restarted the MTA, watching it." in mail.get_body(("plain",)).get_content()
        status, page = rig.gateway.get("/incident?service=helpdesk&key=Mail+queue+stuck")
        assert status == 200
        assert "Restarted the MTA, watching it." in page
        assert 'href="https://acme.pagerduty.com/incidents/PNOTE1"' in page
        assert "Tenex Engineer" in page and "acknowledged" in page

    def test_a_resolve_from_pagerduty_is_not_echoed_back(self, rig: Rig) -> None:
        rig.open_case("Disk full on db1")
        body = event_body("incident.resolved", "Disk full on db1", status="resolved")
        post(rig.gateway, body)
        mail = wait_until(lambda: rig.mails_about("Disk full on db1"), message="no mail")[0]
        wait_for_incident(rig.store, "Disk full on db1", state="resolved")
        # the helpdesk closes the case because of that mail and says so: no resolve goes out
        send_mail(rig.gateway, desk_mail("Disk full on db1", "Resolved"))
        # and our own notification, bounced back into the gateway, is caught by the loop guard
        send_mail(rig.gateway, mail.as_bytes(policy=POLICY))
        outcomes = wait_until(
            lambda: _decided(rig.store, "Disk full on db1", 3), message="mails not decided"
        )
        assert Outcome.LOOP_IGNORED in outcomes
        wait_until(
            lambda: not [o for o in rig.store.outbox(("pending",)) if o.kind == "pagerduty"],
            message="PagerDuty events still queued",
        )
        assert rig.pd_actions("Disk full on db1") == ["trigger"]  # no resolve went back
        kinds = [e["kind"] for e in rig.store.events(limit=500)
                 if e.get("incident_key") == "Disk full on db1"]  # fmt: skip
        assert "echo_suppressed" in kinds


def _decided(store: Store, subject: str, count: int) -> list[str] | None:
    """The outcomes of the decided jobs of `subject` (and loop-guarded mail), once `count`."""
    jobs = [
        j
        for j in store.jobs(limit=500)
        if j.incident_key == subject or j.outcome == Outcome.LOOP_IGNORED
    ]
    decided = [j.outcome for j in jobs if j.state == "done"]
    return decided if len(decided) >= count else None
