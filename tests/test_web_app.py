"""The web app's routes through `httpx.ASGITransport`: no server, a real store in tmp_path.

What a real listener adds (uvicorn's own answers, timeouts on the request head, the connection
limit) is in tests/test_web_server.py; the whole gateway behind it in tests/test_web.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.config import OutgoingSettings, WebSettings
from gateway.node import set_node
from gateway.store import StoreThread
from gateway.web.hardening import SECURITY_HEADERS, Limits
from gateway.web.metrics import CONTENT_TYPE, LiveState
from gateway.web.notify import NotifyEndpoint
from gateway.web.status import WebApp
from tests.conftest import ROOT
from tests.ops_support import metric

TOKEN = "retry-token"
NOTIFY_TOKEN = "notify-token"
CASE29 = ROOT / "tests" / "fixtures" / "case29.json"
SMTP_UP = SimpleNamespace(
    bound=[("127.0.0.1", 2525)],
    closing=False,
    active_sessions=0,
    refusal_counts={},
    pacing_counts={},
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreThread]:
    thread = StoreThread(tmp_path / "gateway.sqlite3", "web-test")
    yield thread
    thread.close()


@pytest.fixture
def web(store: StoreThread) -> WebApp:
    return WebApp(store, WebSettings(token=TOKEN), live=LiveState(smtp=SMTP_UP))


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the ASGI app, on a fresh event loop (as the store thread expects)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_healthz_ok(web: WebApp) -> None:
    response = call(web, "GET", "/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == "ok"
    assert body["smtp"] == {"ok": True, "detail": {"listening": ["127.0.0.1:2525"], "paced": 0}}
    assert body["store"]["ok"] and body["outbox"]["detail"]["pending"] == 0


def test_healthz_degraded_without_smtp(web: WebApp) -> None:
    web.live = LiveState()  # the SMTP listener never started
    response = call(web, "GET", "/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "failing"
    assert response.json()["smtp"] == {"ok": False, "detail": {"error": "not started"}}


def test_head_answers_without_a_body(web: WebApp) -> None:
    response = call(web, "HEAD", "/healthz")
    assert response.status_code == 200 and response.content == b""


def test_metrics_content_type(web: WebApp) -> None:
    response = call(web, "GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert metric(response.text, "gateway_messages_accepted_total") == 0.0
    assert metric(response.text, "gateway_smtp_up") == 1.0


def test_metrics_show_smtp_pacing(web: WebApp, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"paced": 12, "waited_seconds": 0.75, "timed_out": 1}
    monkeypatch.setattr(SMTP_UP, "pacing_counts", counts)
    text = call(web, "GET", "/metrics").text
    assert metric(text, "gateway_smtp_paced_total") == 12
    assert metric(text, "gateway_smtp_paced_seconds_total") == 0.75
    assert metric(text, "gateway_smtp_pacing_timeouts_total") == 1


def test_every_metric_names_the_node_that_answered(web: WebApp) -> None:
    """Several nodes can share one store: /metrics says which one answered (issue 13)."""
    set_node("mx2")
    try:
        text = call(web, "GET", "/metrics").text
    finally:
        set_node("")
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all('node="mx2"' in line for line in samples)
    assert metric(text, "gateway_smtp_up", node="mx2") == 1.0


def test_status_page_renders(web: WebApp) -> None:
    response = call(web, "GET", "/?retried=7")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Email gateway</h1>" in response.text
    assert "Outbox item 7 re-queued." in response.text
    assert "No dead letters." in response.text


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/jobs/12345", id="unknown-job"),
        pytest.param("/jobs/9999999999999999999", id="beyond-a-row-id"),
        pytest.param("/jobs/abc", id="not-a-number"),
        pytest.param("/healthz/", id="trailing-slash"),
        pytest.param("/nothing", id="unknown-path"),
    ],
)
def test_not_found(web: WebApp, path: str) -> None:
    assert call(web, "GET", path).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("DELETE", "/", id="delete-index"),
        pytest.param("POST", "/healthz", id="post-healthz"),
        pytest.param("GET", "/outbox/1/retry", id="get-retry"),
        pytest.param("GET", "/notify/case_new", id="get-notify"),
    ],
)
def test_wrong_method(web: WebApp, method: str, path: str) -> None:
    assert call(web, method, path).status_code == 405


RETRY_REFUSALS = [
    pytest.param({"Origin": "http://evil.example"}, {"token": TOKEN}, 403, id="cross-origin"),
    pytest.param({}, {}, 403, id="no-token"),
    pytest.param({}, {"token": "guess"}, 403, id="wrong-token"),
    pytest.param({"Origin": "http://gw.test"}, {"token": TOKEN}, 404, id="same-origin-no-item"),
    pytest.param({"Origin": "null"}, {"token": TOKEN}, 404, id="opaque-origin"),
]


@pytest.mark.parametrize(("headers", "form", "status"), RETRY_REFUSALS)
def test_retry_needs_same_origin_and_the_token(
    web: WebApp, headers: dict[str, str], form: dict[str, str], status: int
) -> None:
    response = call(web, "POST", "/outbox/1/retry", headers=headers, data=form)
    assert response.status_code == status, response.text


def test_retry_is_off_without_a_configured_token(web: WebApp) -> None:
    web.settings = WebSettings(token=None)
    response = call(web, "POST", "/outbox/1/retry", data={"token": ""})
    assert response.status_code == 403 and "retry is disabled" in response.text


@pytest.fixture
def notifying(web: WebApp, store: StoreThread) -> WebApp:
    web.notify = NotifyEndpoint(
        store, ROOT / "templates", OutgoingSettings(from_addr="gw@gateway.test"), NOTIFY_TOKEN
    )
    return web


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-token"),
        pytest.param({"Authorization": "Bearer wrong"}, 401, id="wrong-token"),
        pytest.param({"Authorization": f"Basic {NOTIFY_TOKEN}"}, 401, id="not-bearer"),
        pytest.param({"Authorization": f"Bearer {NOTIFY_TOKEN}"}, 202, id="right-token"),
    ],
)
def test_notify_requires_the_token(notifying: WebApp, headers: dict[str, str], status: int) -> None:
    response = call(
        notifying, "POST", "/notify/case_new", headers=headers, content=CASE29.read_bytes()
    )
    assert response.status_code == status, response.text
    if status == 202:
        assert response.json()["to"] == ["desk@gateway.example"]


def test_notify_is_off_unless_configured(web: WebApp) -> None:
    headers = {"Authorization": f"Bearer {NOTIFY_TOKEN}"}
    assert call(web, "POST", "/notify/case_new", headers=headers).status_code == 404


def test_body_too_large_announced(web: WebApp) -> None:
    body = b"token=" + b"a" * Limits().max_body_bytes
    response = call(web, "POST", "/outbox/1/retry", content=body)
    assert response.status_code == 413


def test_body_too_large_streamed(web: WebApp) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"a" * 8192

    response = call(web, "POST", "/outbox/1/retry", content=chunks())
    assert response.status_code == 413


def test_slow_body_times_out(store: StoreThread) -> None:
    web = WebApp(store, WebSettings(token=TOKEN), limits=Limits(request_timeout=0.2))

    async def trickle() -> AsyncIterator[bytes]:
        yield b"token="
        await asyncio.sleep(5)
        yield b"late"

    response = call(web, "POST", "/outbox/1/retry", content=trickle())
    assert response.status_code == 408


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Big": "a" * 20_000}, id="bytes"),
        pytest.param({f"X-H{i}": "1" for i in range(120)}, id="count"),
    ],
)
def test_head_too_large(web: WebApp, headers: dict[str, str]) -> None:
    assert call(web, "GET", "/", headers=headers).status_code == 431


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/healthz"), ("GET", "/nothing"), ("DELETE", "/")],
)
def test_every_answer_carries_the_security_headers(web: WebApp, method: str, path: str) -> None:
    response = call(web, method, path)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    assert response.headers["connection"] == "close"


def test_a_failing_handler_is_logged_not_shown(
    web: WebApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(store: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(web.metrics, "read", broken)
    with caplog.at_level(logging.ERROR, logger="gateway.web"):
        response = call(web, "GET", "/metrics")
    assert response.status_code == 500
    assert "secret detail" not in response.text and "Traceback" not in response.text
    assert (
        response.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    )
    assert "GET /metrics failed" in caplog.text and "secret detail" in caplog.text


def test_reload_swaps_settings_for_the_next_request(web: WebApp) -> None:
    assert call(web, "POST", "/outbox/1/retry", data={"token": "new"}).status_code == 403
    web.settings = replace(web.settings, token="new")
    assert call(web, "POST", "/outbox/1/retry", data={"token": "new"}).status_code == 404
