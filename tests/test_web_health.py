"""/healthz and the status page tell the truth: every condition that impairs paging makes
/healthz answer 503 and the page red, each with its reason in words (issue 11, item 9)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from markupsafe import escape

from gateway.config import WebSettings
from gateway.errors import Problem
from gateway.store import Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.conftest import wait_until
from tests.store_support import mail
from tests.web_support import SMTP_UP, call, dead, page_for, service


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
def seed(db: Path) -> Iterator[Store]:
    """The test's own connection, to write scenarios the web app then reads."""
    store = open_store(db)
    yield store
    store.close()


@pytest.fixture
def web(db: Path, seed: Store) -> Iterator[WebApp]:
    thread = StoreThread(db, "web-test")
    app = WebApp(thread, WebSettings(), live=LiveState(smtp=SMTP_UP))
    app.services = [service()]  # as the control plane sets it, at start and on reload
    yield app
    thread.close()


def health(web: WebApp) -> tuple[int, dict]:
    response = call(web, "GET", "/healthz")
    return response.status_code, response.json()


def failing(web: WebApp, check: str) -> str:
    """Asserts /healthz is 503 because of `check`; returns the check's reason in words."""
    status, body = health(web)
    assert status == 503 and body["status"] == "failing", body
    assert body[check]["ok"] is False, body
    [reason] = body["reasons"]
    page = call(web, "GET", "/").text
    assert "DEGRADED" in page and escape(reason) in page  # red on the page, in the same words
    return reason


def test_everything_fine_is_200_with_no_reasons(web: WebApp) -> None:
    status, body = health(web)
    assert status == 200 and body["reasons"] == []
    assert "All 6 checks pass." in call(web, "GET", "/").text


def test_healthz_fails_when_a_mail_waits_too_long_for_its_decision(
    web: WebApp, seed: Store
) -> None:
    web.settings = WebSettings(job_max_age_seconds=0.2)
    seed.accept([mail("stuck")])  # nobody decides it: the worker is down
    wait_until(lambda: health(web)[0] == 503, timeout=10)
    reason = failing(web, "processing")
    assert "has waited" in reason and "for its decision" in reason
    # the detail is rounded to 0.1 s: 0.24 s past a 0.2 s limit shows as 0.2
    assert health(web)[1]["processing"]["detail"]["oldest_pending_age_seconds"] >= 0.2


def test_healthz_fails_while_the_worker_restarts_in_a_loop(web: WebApp) -> None:
    worker = SimpleNamespace(restarts=0)
    web.live = LiveState(smtp=SMTP_UP, worker=worker)
    worker.restarts = 2  # two crashes: worth a word, not yet a loop
    status, _body = health(web)
    assert status == 200 and "restarted 2 time(s) recently" in call(web, "GET", "/").text
    worker.restarts = 3
    reason = failing(web, "worker")
    assert "restarted 3 times in the last 10.0m" in reason and "crashing in a loop" in reason


def test_worker_restarts_outside_the_window_do_not_fail(web: WebApp) -> None:
    web.settings = WebSettings(worker_restart_window_seconds=0.2)
    worker = SimpleNamespace(restarts=5)
    web.live = LiveState(smtp=SMTP_UP, worker=worker)
    assert health(web)[0] == 503
    wait_until(lambda: health(web)[0] == 200, timeout=10)  # the loop stopped: healthy again


def test_healthz_fails_while_a_dead_letter_is_recent(web: WebApp, seed: Store) -> None:
    web.settings = WebSettings(dead_letter_hours=0.0003)  # about a second
    page_for(seed, "Printer on fire", results=(dead(),))
    reason = failing(web, "dead_letters")
    assert "1 dead letter(s)" in reason and "NOT delivered" in reason
    wait_until(lambda: health(web)[0] == 200, timeout=10)  # older than the limit: 200 again
    assert "1 dead letter(s), none in the last" in call(web, "GET", "/").text


def test_healthz_fails_in_local_mode_and_says_so_plainly(web: WebApp) -> None:
    web.services = [service(), service("cron", routing_key=None)]
    reason = failing(web, "pagerduty")
    assert reason == (
        "PagerDuty delivery is OFF for cron: no routing_key (local mode), "
        "incidents are kept here and nothing is sent"
    )
    assert health(web)[1]["pagerduty"]["detail"] == {"local_mode_services": ["cron"]}


@pytest.mark.parametrize(
    ("state", "last_success", "words"),
    [
        pytest.param(
            "error: login failed (retry in 5.0 s)", "now", "mailbox desk FAILED", id="failed"
        ),
        pytest.param("idle", "long ago", "mailbox desk is silent", id="silent"),
    ],
)
def test_healthz_fails_when_an_imap_account_failed_or_is_silent(
    web: WebApp, state: str, last_success: str, words: str
) -> None:
    web.settings = WebSettings(imap_max_silence_seconds=60)
    at = time.time() if last_success == "now" else time.time() - 3600
    poller = SimpleNamespace(
        settings=SimpleNamespace(name="desk"), state=state, last_success=at, errors=1, healthy=True
    )
    web.live = LiveState(smtp=SMTP_UP, imap=[poller])
    reason = failing(web, "imap")
    assert reason.startswith(words)
    poller.state, poller.last_success = "idle", time.time()
    assert health(web)[0] == 200


def test_healthz_fails_after_a_refused_reload_naming_the_file_and_why(web: WebApp) -> None:
    problem = Problem("/etc/gateway/rules/helpdesk.toml", "unknown op 'resembles'", line=4)
    refusal = SimpleNamespace(at=time.time(), reason="SIGHUP", problems=[problem])
    reloader = SimpleNamespace(reloads=0, refused=1, generation=3, last_refusal=refusal)
    web.live = LiveState(smtp=SMTP_UP, reloader=reloader)
    reason = failing(web, "reload")
    assert "the last reload (SIGHUP" in reason and "was REFUSED" in reason
    assert "generation 3" in reason
    assert "/etc/gateway/rules/helpdesk.toml:4: unknown op 'resembles'" in reason
    detail = health(web)[1]["reload"]["detail"]
    assert detail["problems"] == ["/etc/gateway/rules/helpdesk.toml:4: unknown op 'resembles'"]
    reloader.last_refusal = None  # a later reload was accepted
    assert health(web)[0] == 200


def test_health_details_on_the_page_are_words_not_python_reprs(web: WebApp) -> None:
    page = call(web, "GET", "/").text
    assert "accepting mail on 127.0.0.1:2525" in page
    assert "[&#39;127.0.0.1:2525&#39;]" not in page and "{&#39;" not in page
    assert "the database takes commits" in page and "nothing waiting for delivery" in page


def test_paced_intake_is_said_on_the_page_and_stays_healthy(web: WebApp) -> None:
    paced = SimpleNamespace(
        **{**vars(SMTP_UP), "pacing_counts": {"paced": 40, "waited_seconds": 2.5}}
    )
    web.live = LiveState(smtp=paced)
    page = call(web, "GET", "/").text
    assert "40 transactions waited for decisions to catch up since start (2.5 s in all)" in page
    status, checks = health(web)
    assert status == 200 and checks["smtp"]["detail"]["paced"] == 40


def test_reload_swaps_the_thresholds(web: WebApp, seed: Store) -> None:
    seed.accept([mail("slow")])
    assert health(web)[0] == 200  # under the default 300 s
    web.settings = replace(web.settings, job_max_age_seconds=0.05)
    wait_until(lambda: health(web)[0] == 503, timeout=10)
