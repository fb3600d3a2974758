"""Outgoing mail against a real SMTP sink on loopback: delivery, failures, the outbox, the CLI."""

from __future__ import annotations

import asyncio
import email
import json
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.policy import default as default_policy
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from gateway import cli
from gateway.config import OutgoingSettings
from gateway.decide.outgoing_mail import mail_payload, queue_mail
from gateway.delivery.mailer import MailSender, mail_dispatcher
from gateway.delivery.outbox import RetryPolicy
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem, StoreThread, open_store
from gateway.themes.render import Themes, incident_context, load_context, recipients
from tests.conftest import GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.pdserver import PagerDutyStandIn

ROOT = Path(__file__).resolve().parent.parent
CASE29 = ROOT / "tests" / "fixtures" / "case29.json"
FAST = RetryPolicy(first_delay=0.01, max_delay=0.05)


class SinkHandler:
    """Records accepted envelopes; `rcpt_reply` / `data_reply` script a refusal."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.data_reply:
            return self.data_reply
        self.envelopes.append(envelope)
        return f"250 2.0.0 Ok: queued as {len(self.envelopes)}"

    def messages(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(e.content, policy=default_policy) for e in self.envelopes]


class Sink:
    """An aiosmtpd relay stand-in on 127.0.0.1:`port`, started and stopped by the test."""

    def __init__(self, port: int, **smtp_options) -> None:
        self.port = port
        self.handler = SinkHandler()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=port, **smtp_options)

    def start(self) -> Sink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def message():
    return Themes(ROOT / "templates").render("case_new", load_context(CASE29))


def settings(port: int, **kwargs) -> OutgoingSettings:
    return OutgoingSettings(host="127.0.0.1", port=port, from_addr="gw@gateway.test",
                            timeout_seconds=5, **kwargs)  # fmt: skip


def item(payload: dict) -> OutboxItem:
    return OutboxItem(1, "mail", "-", "mail:1", payload, "pending", 0, time.time(), 0.0, "", "")


def send(outgoing: OutgoingSettings, payload: dict, tls: ssl.SSLContext | None = None) -> str:
    async def go() -> str:
        try:
            return await MailSender(outgoing, tls_context=tls)(item(payload))
        finally:
            await asyncio.sleep(0.1)  # a closed TLS transport needs a few loop turns to let go

    return asyncio.run(go())


class TestMailSender:
    def test_delivers_to_the_relay(self, sink: Sink, message) -> None:
        payload = mail_payload(message, "gw@gateway.test", ["desk@gateway.example"])
        assert send(settings(sink.port), payload).startswith("250 2.0.0 Ok: queued as 1")
        envelope = sink.handler.envelopes[0]
        assert envelope.mail_from == "gw@gateway.test"
        assert envelope.rcpt_tos == ["desk@gateway.example"]
        received = sink.handler.messages()[0]
        assert received["Subject"] == "Printer on fire in building 2"
        assert received["Message-ID"] == message["Message-ID"]

    def test_payload_is_json_friendly_7bit_crlf(self, message) -> None:
        payload = mail_payload(message, "gw@x", ["a@y"])
        assert payload["message"].isascii() and "\r\n" in payload["message"]
        assert payload["subject"] == "Printer on fire in building 2"

    def test_relay_down_is_temporary(self, message) -> None:
        payload = mail_payload(message, "gw@x", ["a@y"])
        with pytest.raises(TemporaryDeliveryError, match=r"relay 127\.0\.0\.1"):
            send(settings(free_port()), payload)

    @pytest.mark.parametrize(
        ("where", "reply", "error"),
        [
            pytest.param(
                "data", "554 5.7.1 Message rejected", RejectedDeliveryError, id="data-5xx"
            ),
            pytest.param("rcpt", "550 5.1.1 No such user", RejectedDeliveryError, id="rcpt-5xx"),
            pytest.param("data", "451 4.3.0 Try later", TemporaryDeliveryError, id="data-4xx"),
            pytest.param("rcpt", "450 4.2.0 Greylisted", TemporaryDeliveryError, id="rcpt-4xx"),
        ],
    )
    def test_replies_are_classified(self, sink: Sink, message, where, reply, error) -> None:
        setattr(sink.handler, f"{where}_reply", reply)
        with pytest.raises(error, match=reply.split()[0]):
            send(settings(sink.port), mail_payload(message, "gw@x", ["a@y"]))

    def test_starttls_and_auth(self, message) -> None:
        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        logins: list[bytes] = []

        def authenticator(server, session, envelope, mechanism, data: LoginPassword):
            logins.append(data.login)
            return AuthResult(success=data.password == b"s3cret", handled=False)

        relay = Sink(free_port(), tls_context=server_ctx, require_starttls=True,
                     authenticator=authenticator, auth_required=True).start()  # fmt: skip
        try:
            outgoing = settings(relay.port, security="starttls", username="gw", password="s3cret")
            assert send(outgoing, mail_payload(message, "gw@x", ["a@y"]), client_ctx)[:3] == "250"
            assert logins == [b"gw"] and len(relay.handler.envelopes) == 1
            wrong = settings(relay.port, security="starttls", username="gw", password="nope")
            with pytest.raises(RejectedDeliveryError, match="535"):
                send(wrong, mail_payload(message, "gw@x", ["a@y"]), client_ctx)
        finally:
            relay.stop()


class TestOutbox:
    def run_worker(self, db: Path, port: int) -> None:
        async def go() -> None:
            store = StoreThread(db)
            try:
                worker = mail_dispatcher(store, settings(port), FAST)
                await worker.run_until_idle(time.time() + 5)
            finally:
                store.close()

        asyncio.run(go())

    def test_relay_outage_delays_then_delivers_exactly_once(self, tmp_path: Path, message) -> None:
        db, port = tmp_path / "gw.sqlite3", free_port()
        store = open_store(db)
        item_id = queue_mail(store, message, mail_from="gw@gateway.test")
        self.run_worker(db, port)  # nothing listens on `port`
        [pending] = store.outbox()
        assert (pending.id, pending.state, pending.attempts) == (item_id, "pending", 1)
        assert "relay 127.0.0.1" in pending.last_error

        relay = Sink(port).start()
        try:
            time.sleep(0.1)  # past the (fast) backoff
            self.run_worker(db, port)
            self.run_worker(db, port)
            assert len(relay.handler.envelopes) == 1
            assert relay.handler.envelopes[0].rcpt_tos == ["desk@gateway.example"]
        finally:
            relay.stop()
        assert store.outbox() == []
        [done] = store.outbox(("done",))
        assert done.response.startswith("250")

    def test_rejection_is_a_dead_letter_with_the_reply(self, tmp_path: Path, sink: Sink, message):
        sink.handler.data_reply = "554 5.7.1 Spam score too high"
        store = open_store(tmp_path / "gw.sqlite3")
        queue_mail(store, message, mail_from="gw@gateway.test")
        self.run_worker(store.path, sink.port)
        [dead] = store.outbox()
        assert dead.state == "dead"
        assert dead.response == "554 5.7.1 Spam score too high"
        assert sink.handler.envelopes == []


class TestCli:
    def config(self, tmp_path: Path, port: int | None) -> Path:
        outgoing = f'[outgoing]\nhost = "127.0.0.1"\nport = {port}\nfrom = "gw@gateway.test"\n'
        return write_config(tmp_path, routing_key=None, extra=outgoing if port else "")

    def notify(self, config: Path, *args: str) -> int:
        return cli.main(
            ["--config", str(config), "notify", "case_new", "--case", str(CASE29), *args]
        )

    def test_notify_sends_through_the_outbox(self, tmp_path, sink: Sink, capsys) -> None:
        config = self.config(tmp_path, sink.port)
        assert self.notify(config, "--to", "ops@gateway.example") == 0
        assert "sent <" in capsys.readouterr().out
        [received] = sink.handler.messages()
        assert received["To"] == "ops@gateway.example"
        assert sink.handler.envelopes[0].rcpt_tos == ["ops@gateway.example"]

    def test_notify_with_relay_down_keeps_the_mail_queued(self, tmp_path, capsys) -> None:
        config = self.config(tmp_path, free_port())
        assert self.notify(config) == 0
        assert "queued as outbox item 1" in capsys.readouterr().err
        [pending] = open_store(tmp_path / "data" / "gateway.sqlite3").outbox()
        assert pending.kind == "mail" and pending.state == "pending"

    def test_notify_without_outgoing_is_one_clear_error(self, tmp_path, capsys) -> None:
        assert self.notify(self.config(tmp_path, None)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no [outgoing] section" in err

    def test_render_prints_the_message(self, tmp_path, capsys) -> None:
        argv = ["--config", str(self.config(tmp_path, None)), "render", "case_resolved",
                "--case", str(CASE29)]  # fmt: skip
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "Subject: Printer on fire in building 2\n" in out and "Status: Resolved" in out

    def test_render_theme_error_is_one_clear_error(self, tmp_path, capsys) -> None:
        case = tmp_path / "case.json"
        case.write_text('{"integration_address": "desk@x.example"}')
        argv = ["render", "case_new", "--case", str(case), "--templates", str(ROOT / "templates")]
        assert cli.main(argv) == 1
        assert "case_new/message.txt.j2:3: 'case' is undefined" in capsys.readouterr().err


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `gateway` command, as an operator (or the helpdesk's cron) runs it."""
    command = [sys.executable, "-m", "gateway.cli", "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


class TestRoundTrip:
    """helpdesk theme -> `gateway notify` -> the gateway's own SMTP listener -> incident."""

    @pytest.fixture
    def gateway(self, tmp_path: Path, pd: PagerDutyStandIn) -> Iterator[GatewayProcess]:
        port = free_port()
        outgoing = f'[outgoing]\nhost = "127.0.0.1"\nport = {port}\nfrom = "gw@gateway.test"\n'
        config = write_config(tmp_path, pd_url=pd.url, smtp_port=port, extra=outgoing)
        process = GatewayProcess(config, port).start()
        yield process
        if process.proc is not None and process.proc.poll() is None:
            process.kill()

    def notify(self, gateway: GatewayProcess, theme: str, case: Path) -> str:
        result = run_cli(gateway.config, "notify", theme, "--case", str(case))
        assert result.returncode == 0, result.stderr + gateway.output()
        assert result.stdout.startswith("sent <"), result.stderr
        return result.stdout.split()[1]  # the Message-ID

    def test_case_new_triggers_and_case_resolved_resolves(
        self, gateway: GatewayProcess, pd: PagerDutyStandIn, tmp_path: Path, sink: Sink
    ) -> None:
        case_message_id = self.notify(gateway, "case_new", CASE29)
        [trigger] = pd.wait_for(1)
        assert trigger["event_action"] == "trigger"
        assert trigger["dedup_key"] == "Printer on fire in building 2"
        assert trigger["payload"]["custom_details"]["case"] == "29"

        self.notify(gateway, "case_resolved", CASE29)
        resolve = pd.wait_for(2)[1]
        assert (resolve["event_action"], resolve["dedup_key"]) == ("resolve", trigger["dedup_key"])

        # The gateway's reply to the helpdesk is threaded to the case mail that triggered it.
        store = open_store(tmp_path / "data" / "gateway.sqlite3")
        [incident] = store.incidents()
        context = incident_context(
            "resolve", incident, to=["support@helpdesk.example"], from_addr="gw@gateway.test"
        )
        update = Themes(ROOT / "templates").render("incident_update", context)
        send(settings(sink.port), mail_payload(update, "gw@gateway.test", recipients(update)))
        [received] = sink.handler.messages()
        assert received["In-Reply-To"] == received["References"] == case_message_id
        assert received["Subject"] == "Re: Printer on fire in building 2"

    def test_gateway_ignores_its_own_incident_update(
        self, gateway: GatewayProcess, pd: PagerDutyStandIn, tmp_path: Path
    ) -> None:
        """Loop guard: the update mailed back to the integration address changes nothing."""
        context = load_context(ROOT / "templates" / "incident_update" / "sample.json")
        context["to"] = "desk@gateway.example"
        case = tmp_path / "update.json"
        case.write_text(json.dumps(context))
        self.notify(gateway, "incident_update", case)
        store = open_store(tmp_path / "data" / "gateway.sqlite3")
        [job] = wait_until(lambda: [j for j in store.jobs() if j.outcome], message="not processed")
        assert job.outcome == "loop_ignored"
        assert store.incidents() == [] and pd.events == []


class TestIncidentUpdates:
    """`notify` on a service: the gateway mails the helpdesk when the incident changes."""

    def test_trigger_and_resolve_mail_the_helpdesk_threaded_to_the_case(
        self, tmp_path: Path, pd: PagerDutyStandIn, sink: Sink
    ) -> None:
        port = free_port()
        config = write_config(
            tmp_path,
            pd_url=pd.url,
            smtp_port=port,
            service_extra='notify = { theme = "incident_update", to = ["agents@helpdesk.example"],'
            ' on = ["trigger", "resolve"] }',
            extra=f'[outgoing]\nhost = "127.0.0.1"\nport = {sink.port}\nfrom = "gw@gateway.test"\n',
        )
        gateway = GatewayProcess(config, port).start()
        try:
            with smtplib.SMTP("127.0.0.1", port) as client:
                new = desk_mail("Printer on fire", message_id="<case-29@helpdesk.example>")
                client.sendmail("support@helpdesk.example", ["desk@gateway.example"], new)
                again = desk_mail("Printer on fire")  # a duplicate: not subscribed, no mail
                client.sendmail("support@helpdesk.example", ["desk@gateway.example"], again)
                done = desk_mail("Re: Printer on fire", "Resolved")
                client.sendmail("support@helpdesk.example", ["desk@gateway.example"], done)
            pd.wait_for(2)  # trigger, resolve: the repeat is coalesced (issue 12)
            messages = wait_until(
                lambda: len(sink.handler.envelopes) >= 2 and sink.handler.messages(),
                message=f"no incident_update mail:\n{gateway.output()}",
            )
        finally:
            gateway.stop()
        assert [m["X-Gateway-Event"] for m in messages] == ["trigger", "resolve"]
        for message in messages:
            assert message["To"] == "agents@helpdesk.example"
            assert message["In-Reply-To"] == "<case-29@helpdesk.example>"
            assert message["Auto-Submitted"] == "auto-generated"
        assert sink.handler.envelopes[0].rcpt_tos == ["agents@helpdesk.example"]


class TestNotifyWebhook:
    """POST /notify/<theme>: a helpdesk that can call a webhook but cannot template mail."""

    TOKEN = "s3cret-webhook-token"

    @pytest.fixture
    def gateway(self, tmp_path: Path, pd: PagerDutyStandIn, sink: Sink) -> Iterator[GatewayProcess]:
        port, web_port = free_port(), free_port()
        extra = (
            f'[web]\nlisten = "127.0.0.1:{web_port}"\nnotify_token = "{self.TOKEN}"\n'
            f'[outgoing]\nhost = "127.0.0.1"\nport = {sink.port}\nfrom = "gw@gateway.test"\n'
        )
        process = GatewayProcess(
            write_config(tmp_path, pd_url=pd.url, smtp_port=port, extra=extra), port
        )
        process.web = f"http://127.0.0.1:{web_port}"  # type: ignore[attr-defined]
        process.start()
        yield process
        process.kill()

    def post(self, gateway: GatewayProcess, path: str, body: bytes, token: str) -> tuple[int, str]:
        request = urllib.request.Request(
            gateway.web + path,  # type: ignore[attr-defined]
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:  # the web listener is not up yet
            return 0, ""

    def test_case_json_is_rendered_and_mailed(self, gateway: GatewayProcess, sink: Sink) -> None:
        wait_until(lambda: self.post(gateway, "/notify/case_new", b"{}", "x")[0] == 401)
        status, body = self.post(gateway, "/notify/case_new", CASE29.read_bytes(), self.TOKEN)
        assert status == 202, body
        queued = json.loads(body)
        assert queued["to"] == ["desk@gateway.example"]
        [message] = wait_until(sink.handler.messages, message=gateway.output())
        assert message["Subject"] == "Printer on fire in building 2"
        assert message["Message-ID"] == queued["message_id"]
        assert "Status: New" in message.get_body(("plain",)).get_content()

    @pytest.mark.parametrize(
        ("path", "body", "token", "status"),
        [
            pytest.param("/notify/case_new", b"{}", "wrong", 401, id="wrong-token"),
            pytest.param("/notify/case_new", b"not json", TOKEN, 400, id="not-json"),
            pytest.param("/notify/case_new", b"[1]", TOKEN, 400, id="not-an-object"),
            pytest.param("/notify/case_new", b"{}", TOKEN, 400, id="missing-fields"),
            pytest.param("/notify/nope", b"{}", TOKEN, 404, id="unknown-theme"),
        ],
    )
    def test_refusals(
        self, gateway: GatewayProcess, sink: Sink, path: str, body: bytes, token: str, status: int
    ) -> None:
        wait_until(lambda: self.post(gateway, "/notify/x", b"{}", "x")[0] != 0)
        assert self.post(gateway, path, body, token)[0] == status
        assert sink.handler.envelopes == []
