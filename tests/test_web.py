"""The web listener against a real `gateway serve`: health transitions, metrics after a
scripted run, the status page's escaping, the retry form's token, and HTTP hardening."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import desk_mail, free_port, wait_until, write_config
from tests.ops_support import WebGateway, metric, running, web_config, worker_pid
from tests.pdserver import PagerDutyStandIn

TOKEN = "correct horse battery staple"


@pytest.fixture
def web_gateway(tmp_path: Path, pd: PagerDutyStandIn) -> Iterator[WebGateway]:
    config, port, web_port = web_config(
        tmp_path, pd.url, token=TOKEN, web="outbox_max_age_seconds = 2"
    )
    with running(config, port, web_port) as gateway:
        yield gateway


def jobs_done(gateway: WebGateway, count: int) -> bool:
    db = gateway.config.parent / "data" / "gateway.sqlite3"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE state='done'").fetchone()[0] >= count


def test_metrics_after_a_scripted_run(web_gateway: WebGateway, pd: PagerDutyStandIn) -> None:
    web_gateway.send(desk_mail("Printer on fire"))
    web_gateway.send(desk_mail("Disk full"))
    web_gateway.send(desk_mail("Printer on fire", "Resolved"))
    web_gateway.send(desk_mail("Lunch menu", "Whatever"))  # no rule matches
    duplicate = desk_mail("Disk full", message_id="<same@helpdesk.example>")
    web_gateway.send(duplicate)
    web_gateway.send(duplicate)
    # issue 12: the repeat trigger of "Disk full" (open) is absorbed, not sent again
    pd.wait_for(3)
    wait_until(lambda: jobs_done(web_gateway, 5))

    def scrape() -> str:
        return web_gateway.get("/metrics")[1]

    text = wait_until(
        lambda: (
            (t := scrape()) and metric(t, "gateway_events_sent_total", kind="pagerduty") == 3 and t
        )
    )
    assert metric(text, "gateway_messages_accepted_total") == 6
    assert metric(text, "gateway_messages_duplicate_total") == 1
    new_case = metric(text, "gateway_rule_matches_total", service="helpdesk", rule="new case")
    assert new_case == 3
    resolved = metric(text, "gateway_rule_matches_total", service="helpdesk", rule="resolved case")
    assert resolved == 1
    assert metric(text, "gateway_messages_unmatched_total", service="helpdesk") == 1
    assert metric(text, "gateway_messages_quarantined_total", service="helpdesk") == 0
    assert metric(text, "gateway_incidents_open", service="helpdesk") == 1
    assert metric(text, "gateway_outbox_depth", kind="pagerduty") == 0
    assert metric(text, "gateway_storm_coalesced", service="helpdesk") == 1
    assert metric(text, "gateway_storm_queued", service="helpdesk") == 0
    assert metric(text, "gateway_smtp_up") == 1
    assert metric(text, "gateway_smtp_sessions") == 0
    assert metric(text, "gateway_processing_latency_seconds_count") == 5
    assert metric(text, "gateway_processing_latency_seconds_bucket", le="+Inf") == 5


def test_health_fails_while_pagerduty_is_down_and_recovers(
    web_gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    status, body = web_gateway.health()
    assert status == 200 and body["status"] == "ok"
    assert body["store"]["ok"] and body["smtp"]["detail"]["listening"]

    pd.fail_next(1000, 500)  # PagerDuty answers 500: the item stays pending and ages
    web_gateway.send(desk_mail("Printer on fire"))
    status, body = wait_until(lambda: (h := web_gateway.health())[0] == 503 and h, timeout=20)
    assert body["outbox"]["ok"] is False and body["outbox"]["detail"]["pending"] == 1

    with pd.lock:
        pd.script.clear()  # PagerDuty is back: the next retry delivers
    pd.wait_for(1, timeout=30)
    status, body = wait_until(lambda: (h := web_gateway.health())[0] == 200 and h, timeout=10)
    assert body["outbox"]["detail"]["pending"] == 0
    text = web_gateway.get("/metrics")[1]
    assert metric(text, "gateway_events_retried_total", kind="pagerduty") >= 1


def test_status_page_escapes_mail_content_and_links_the_trace(
    web_gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    web_gateway.send(desk_mail("<script>alert(1)</script> Printer", extra="<img src=x onerror=1>"))
    pd.wait_for(1)
    wait_until(lambda: "alert(1)" in web_gateway.get("/")[1])
    status, page = web_gateway.get("/")
    assert status == 200
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Printer" in page
    status, job = web_gateway.get("/jobs/1")
    assert status == 200 and "Rule trace" in job and "new case" in job
    assert "<img src=x" not in job and "&lt;img src=x onerror=1&gt;" in job
    assert web_gateway.get("/jobs/999")[0] == 404


def post(gateway: WebGateway, path: str, form: dict[str, str]) -> int:
    data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(gateway.base + path, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_retry_needs_the_token(web_gateway: WebGateway, pd: PagerDutyStandIn) -> None:
    pd.fail_next(1, 400)  # PagerDuty rejects the event: dead letter
    web_gateway.send(desk_mail("Printer on fire"))
    wait_until(lambda: "dead-letter" in web_gateway.get("/")[1])
    assert post(web_gateway, "/outbox/1/retry", {}) == 403
    assert post(web_gateway, "/outbox/1/retry", {"token": "guess"}) == 403
    assert post(web_gateway, "/outbox/1/retry", {"token": TOKEN}) == 200  # 303 -> the page
    pd.wait_for(1)
    assert post(web_gateway, "/outbox/1/retry", {"token": TOKEN}) == 404  # not dead any more
    assert web_gateway.get("/outbox/1/retry")[0] == 405


def raw_http(gateway: WebGateway, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.web_port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


HARDENING = [
    pytest.param(b"NONSENSE\r\n\r\n", b"400", id="garbage"),
    pytest.param(
        b"POST /outbox/1/retry HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n",
        b"413",
        id="body-too-large",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
        b"431",
        id="headers-too-large",
    ),
    pytest.param(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", b"404", id="unknown-path"),
    pytest.param(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405", id="wrong-method"),
]


def test_http_hardening(web_gateway: WebGateway) -> None:
    """One gateway for every case: each malformed request gets a deliberate answer."""
    for case in HARDENING:
        request_bytes, status = case.values
        answer = raw_http(web_gateway, request_bytes)
        assert answer.split(b" ", 2)[1] == status, (case.id, answer[:200])
        assert b"Content-Security-Policy: default-src 'none'" in answer
    assert web_gateway.health()[0] == 200  # and it still serves


# -- health that tells the truth, against a real `gateway serve` (issue 11, items 9 and 21) ------

BAD_RULE = """
[[rule]]
name = "broken"
conditions = [ { field = "body", op = "resembles", value = "x" } ]
action = "trigger"
incident_key = { field = "subject" }
"""


def reasons(gateway: WebGateway) -> list[str]:
    """Why /healthz fails ([] while it answers 200, or does not answer yet)."""
    status, body = gateway.get("/healthz")
    return json.loads(body)["reasons"] if status == 503 else []


def test_healthz_names_a_refused_reload_and_recovers_when_it_is_fixed(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    config, port, web_port = web_config(tmp_path, pd.url, own_rules=True)
    rules = tmp_path / "rules" / "helpdesk.toml"
    original = rules.read_text()
    with running(config, port, web_port) as gateway:
        rules.write_text(BAD_RULE + original)
        [reason] = wait_until(lambda: reasons(gateway), message=gateway.output())
        assert "the last reload (changed:" in reason and "was REFUSED" in reason
        assert f"{rules}:" in reason and "unknown op 'resembles'" in reason
        assert "still running generation 1" in reason
        rules.write_text(original)
        wait_until(lambda: gateway.health()[0] == 200, message=gateway.output())


def test_healthz_fails_while_the_worker_crashes_in_a_loop(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    config, port, web_port = web_config(tmp_path, pd.url, web="worker_max_restarts = 3")
    with running(config, port, web_port) as gateway:
        assert gateway.proc is not None
        for crash in range(3):
            worker = wait_until(lambda: worker_pid(gateway.proc.pid), message=gateway.output())
            assert gateway.health()[0] == 200, (crash, gateway.health())
            os.kill(worker, signal.SIGKILL)
            wait_until(
                lambda w=worker: worker_pid(gateway.proc.pid) not in (None, w),
                message=gateway.output(),
            )
        [reason] = wait_until(lambda: reasons(gateway), message=gateway.output())
        assert "the worker restarted 3 times in the last 10.0m" in reason


def test_healthz_fails_in_local_mode_and_the_page_says_so(tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    web = f'[web]\nlisten = "127.0.0.1:{web_port}"\n'
    gateway = WebGateway(
        write_config(tmp_path, routing_key=None, smtp_port=port, extra=web), port, web_port
    )
    try:
        gateway.start()
        [reason] = wait_until(lambda: reasons(gateway), message=gateway.output())
        assert reason.startswith("PagerDuty delivery is OFF for helpdesk: no routing_key")
        status, page = gateway.get("/")
        assert status == 200 and "DEGRADED" in page and "local mode" in page
    finally:
        gateway.stop()


def test_the_id_in_queued_as_names_the_mail_on_the_status_page(
    web_gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    first = desk_mail("Printer on fire")
    web_gateway.send(first)
    web_gateway.send(first)  # a redelivery: a message of its own, no job
    with smtplib.SMTP("127.0.0.1", web_gateway.port, timeout=10) as client:
        client.ehlo()
        client.mail("support@helpdesk.example")
        client.rcpt("desk@gateway.example")
        code, reply = client.data(desk_mail("Disk full"))
    assert code == 250
    message = int(re.search(rb"queued as (\d+)", reply).group(1))  # type: ignore[union-attr]
    assert message == 3  # the job is number 2: the ids differ
    pd.wait_for(2)
    status, page = web_gateway.get(f"/messages/{message}")
    assert status == 200 and f"<h1>Message {message}</h1>" in page and "Disk full" in page
    status, index = web_gateway.get("/")
    assert f'<a href="/messages/{message}">{message}</a>' in index
    status, redirected = web_gateway.get("/jobs/2")  # old links: the job's message
    assert status == 200 and f"<h1>Message {message}</h1>" in redirected
