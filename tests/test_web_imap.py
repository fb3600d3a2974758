"""IMAP on the web side: messages that could not be read on the status page and in /metrics,
and an account whose connection failed on /healthz (issue 11, items 1 and 3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.config import WebSettings
from gateway.store import Store, StoreThread
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.ops_support import metric
from tests.test_web_app import SMTP_UP, call


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreThread]:
    thread = StoreThread(tmp_path / "gateway.sqlite3", "web-imap-test")
    yield thread
    thread.close()


def poller(healthy: bool, state: str) -> SimpleNamespace:
    return SimpleNamespace(
        settings=SimpleNamespace(name="desk"),
        state=state,
        healthy=healthy,
        last_success=time.time(),
        errors=0 if healthy else 1,
    )


@pytest.fixture
def web(store: StoreThread) -> WebApp:
    live = LiveState(smtp=SMTP_UP, imap=[poller(True, "idle")])
    return WebApp(store, WebSettings(), live=live)


def owe_two(store: StoreThread) -> None:
    """UID 2 reported unreadable, UID 5 still retrying quietly."""

    def write(s: Store) -> None:
        s.save_imap_position("desk", "INBOX", 7, 5)
        for _ in range(3):
            s.record_imap_failure("desk", "INBOX", 2, "FETCH failed: Internal error", 9e9)
        s.report_imap_failure("desk", "INBOX", 2, service="helpdesk", detail="UID 2 unreadable")
        s.record_imap_failure("desk", "INBOX", 5, "left out of the answer", 9e9)

    asyncio.run(store.call(write))


def test_status_page_lists_messages_that_could_not_be_read(web: WebApp, store: StoreThread) -> None:
    assert "Unread IMAP messages" not in call(web, "GET", "/").text
    owe_two(store)
    page = call(web, "GET", "/").text
    assert "Unread IMAP messages (2)" in page
    assert "reported unreadable" in page and "retrying" in page
    assert "FETCH failed: Internal error" in page


def test_metrics_count_failing_and_unreadable_messages(web: WebApp, store: StoreThread) -> None:
    owe_two(store)
    text = call(web, "GET", "/metrics").text
    assert metric(text, "gateway_imap_messages_failing", account="desk") == 2.0
    assert metric(text, "gateway_imap_messages_unreadable", account="desk") == 1.0


def test_healthz_fails_while_an_account_reconnects(web: WebApp) -> None:
    web.live = LiveState(smtp=SMTP_UP, imap=[poller(False, "error: the server did not answer")])
    response = call(web, "GET", "/healthz")
    assert response.status_code == 503
    account = response.json()["imap"]["detail"]["accounts"]["desk"]
    assert account["ok"] is False and account["state"].startswith("error")
