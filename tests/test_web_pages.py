"""The status page's content through `httpx.ASGITransport`, over a real store: what PagerDuty
was told about each incident (item 10), one id per mail (item 21), stale incidents (item 23),
the charts, filters, times with their zone and the incident timeline (item 25)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.config import WebSettings
from gateway.node import set_node
from gateway.store import JobDecision, OutboxResult, Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.store_support import incident, mail
from tests.web_support import SMTP_UP, call, dead, delivered, failed, page_for, service


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
def seed(db: Path) -> Iterator[Store]:
    store = open_store(db)
    yield store
    store.close()


@pytest.fixture
def web(db: Path, seed: Store) -> Iterator[WebApp]:
    thread = StoreThread(db, "web-test")
    app = WebApp(thread, WebSettings(token="t"), live=LiveState(smtp=SMTP_UP))
    app.services = [service(), service("other")]  # as the control plane sets it
    yield app
    thread.close()


def get(web: WebApp, path: str) -> str:
    response = call(web, "GET", path)
    assert response.status_code == 200, (path, response.status_code, response.text)
    return response.text


def incident_row(page: str, key: str) -> str:
    rows = [r for r in re.findall(r'<tr class="incident.*?</tr>', page, re.S) if f">{key}<" in r]
    assert len(rows) == 1, page
    return rows[0]


# -- item 10: an incident shows what PagerDuty was told ------------------------------------------


def test_a_dead_lettered_trigger_is_shown_as_not_delivered_not_as_paged(
    web: WebApp, seed: Store
) -> None:
    paged = page_for(seed, "Printer on fire", results=(dead("HTTP 400: invalid routing key"),))
    row = incident_row(get(web, "/"), "Printer on fire")
    assert "triggered" in row  # the local state is still what the mail asked for
    assert "NOT DELIVERED" in row and "HTTP 400: invalid routing key" in row
    assert f'href="/outbox/{paged.item}"' in row
    message = get(web, f"/messages/{paged.message}")
    sent = message[message.index("What this decision sent") : message.index('id="trace"')]
    assert "NOT DELIVERED (dead letter)" in sent and f'href="/outbox/{paged.item}"' in sent
    assert "refused: dead letter (HTTP 400: invalid routing key)" in sent  # attempt, answer


@pytest.mark.parametrize(
    ("results", "words"),
    [
        pytest.param((), "pending: the trigger (#1) is queued, not tried yet", id="queued"),
        pytest.param(
            (failed(),),
            "pending: the trigger (#1): 1 attempt(s) failed, last: HTTP 503",
            id="retrying",
        ),
        pytest.param((failed(), delivered()), ">delivered", id="delivered"),
    ],
)
def test_every_incident_row_shows_its_delivery_state(
    web: WebApp, seed: Store, results: tuple, words: str
) -> None:
    page_for(seed, "Disk full", results=results)
    row = incident_row(get(web, "/"), "Disk full")
    assert words in re.sub(r"\s+", " ", row)
    assert 'href="/outbox/1"' in row


def test_an_incident_in_local_mode_is_not_delivered(web: WebApp, seed: Store) -> None:
    web.services = [service(routing_key=None)]
    with seed.transaction():
        seed.save_incident(incident("Kept here", at=time.time()))
    row = incident_row(get(web, "/"), "Kept here")
    assert "NOT DELIVERED: local mode (no routing_key)" in row


def test_a_later_delivered_event_makes_an_earlier_dead_letter_a_note(
    web: WebApp, seed: Store
) -> None:
    first = page_for(seed, "Flaky", results=(dead(),))
    with seed.transaction():  # a repeat trigger of the same key, queued behind it
        repeat = seed.add_outbox(
            "pagerduty",
            "helpdesk",
            "pagerduty:helpdesk:Flaky",
            {"event_action": "trigger", "dedup_key": "Flaky"},
            None,
        )
    assert "pending" in incident_row(get(web, "/"), "Flaky")
    seed.record_outbox([OutboxResult(repeat, "done", response="{}")])
    row = re.sub(r"\s+", " ", incident_row(get(web, "/"), "Flaky"))
    assert f">delivered: an earlier event is a dead letter (#{first.item})" in row


# -- item 21: one id for a mail everywhere -------------------------------------------------------


def test_a_mail_is_named_by_its_message_id_and_old_job_links_redirect(
    web: WebApp, seed: Store
) -> None:
    seed.accept([mail("a", ("helpdesk", "other"), raw=b"Subject: two services\r\n\r\n")])
    seed.accept([mail("a", ("helpdesk", "other"))])  # a redelivery: message 2, no job
    [third] = seed.accept([mail("b", raw=b"Subject: the third mail\r\n\r\n")])
    assert third.id == 3
    jobs = {j.message: j.id for j in seed.jobs()}
    assert jobs[3] == 3 - 0 and len(seed.jobs()) == 3  # jobs 1, 2 (message 1), 3 (message 3)
    index = get(web, "/")
    assert 'href="/messages/3"' in index and 'href="/messages/1"' in index
    assert 'href="/jobs/' not in index
    page = get(web, "/messages/3")
    assert "<h1>Message 3</h1>" in page and "the third mail" in page
    both = get(web, "/messages/1")
    assert 'id="job-1"' in both and 'id="job-2"' in both  # one decision per service
    assert "duplicate of" in get(web, "/messages/2")
    redirect = call(web, "GET", "/jobs/2")
    assert redirect.status_code == 302 and redirect.headers["location"] == "/messages/1#job-2"
    assert call(web, "GET", "/jobs/99").status_code == 404
    assert call(web, "GET", "/messages/99").status_code == 404


def test_a_retry_from_the_page_is_logged_with_the_message_id(
    web: WebApp, seed: Store, caplog: pytest.LogCaptureFixture
) -> None:
    paged = page_for(seed, "Printer on fire", results=(dead(),))
    caplog.set_level("INFO", logger="gateway.web")
    response = call(web, "POST", f"/outbox/{paged.item}/retry", data={"token": "t"})
    assert response.status_code == 303
    assert f"outbox item {paged.item} (message {paged.message}) re-queued" in caplog.text


# -- item 23: stale incidents ----------------------------------------------------------------------


def test_the_page_flags_incidents_open_longer_than_stale_incident_hours(
    web: WebApp, seed: Store
) -> None:
    web.settings = WebSettings(stale_incident_hours=2)
    page_for(seed, "Forgotten", opened_at=time.time() - 3 * 3600)
    page_for(seed, "Fresh")
    page = get(web, "/")
    assert 'class="incident stale"' in incident_row(page, "Forgotten")
    assert "STALE: open longer than 2.0h" in incident_row(page, "Forgotten")
    assert "STALE" not in incident_row(page, "Fresh")


# -- item 25: pictures, filters, zones, timeline ----------------------------------------------------


def bars(page: str, chart: str = "mail-chart") -> dict[str, int]:
    svg = page[page.index(f'<svg id="{chart}"') : page.index("</svg>", page.index(chart))]
    counts: dict[str, int] = {}
    for category, count in re.findall(r'<rect class="bar (\w+)" [^>]*data-count="(\d+)"', svg):
        counts[category] = counts.get(category, 0) + int(count)
    return counts


def test_the_mail_chart_counts_each_outcome_per_minute(web: WebApp, seed: Store) -> None:
    page_for(seed, "One")
    page_for(seed, "Two")
    seed.accept([mail("x", raw=b"Subject: x\r\n\r\n"), mail("y"), mail("z")])
    seed.accept([mail("x")])  # redelivered
    pending = [j.id for j in seed.pending_jobs()]
    with seed.transaction():
        seed.finish_job(JobDecision(pending[0], outcome="unmatched", reason="no rule"))
        seed.finish_job(
            JobDecision(pending[1], outcome="resolved", reason="rule", incident_key="One")
        )
    page = get(web, "/")
    expected = {"triggered": 2, "unmatched": 1, "resolved": 1, "duplicate": 1, "other": 1}
    assert bars(page) == expected
    legend = dict(re.findall(r'data-category="(\w+)" data-total="(\d+)"', page))
    assert legend == {**{k: str(v) for k, v in expected.items()}, "quarantined": "0"}


def test_the_latency_chart_shows_p50_and_p99_of_delivered_events(web: WebApp, seed: Store) -> None:
    for n in range(3):
        page_for(seed, f"Case {n}", results=(delivered(),))
    page_for(seed, "Dead", results=(dead(),))
    page = get(web, "/")
    svg = page[page.index('<svg id="latency-chart"') :]
    assert svg.count('class="point p50"') == 1 and svg.count('class="point p99"') == 1
    assert 'data-total="3">events delivered: 3' in page
    assert re.search(
        r"<title>\d\d:\d\d \w+: 3 event\(s\) delivered, p50 \d+ ms, p99 \d+ ms</title>", svg
    )


def test_the_page_has_pictures_but_no_script_and_refreshes_itself(web: WebApp) -> None:
    response = call(web, "GET", "/")
    page = response.text
    assert "<script" not in page.lower() and "javascript:" not in page.lower()
    assert '<meta http-equiv="refresh" content="60; url=/">' in page
    assert page.count("<svg ") == 2
    assert "script-src" not in response.headers["content-security-policy"]
    web.settings = WebSettings(refresh_seconds=0)
    assert 'http-equiv="refresh"' not in get(web, "/")


def test_times_carry_their_time_zone(web: WebApp, seed: Store) -> None:
    page_for(seed, "Printer on fire")
    zone = time.strftime("%Z")
    page = get(web, "/")
    assert re.search(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {zone}<", page)
    assert f"times are in {zone} (UTC" in page


@pytest.mark.parametrize(
    ("query", "subjects"),
    [
        pytest.param("", {"New case", "Lunch", "Other service"}, id="all"),
        pytest.param("?outcome=unmatched", {"Lunch"}, id="outcome"),
        pytest.param("?outcome=triggered&outcome=unmatched", {"New case", "Lunch"}, id="outcomes"),
        pytest.param("?service=other", {"Other service"}, id="service"),
        pytest.param("?outcome=pending&service=other", {"Other service"}, id="both"),
        pytest.param("?outcome=&service=", {"New case", "Lunch", "Other service"}, id="empty"),
    ],
)
def test_recent_messages_filter_by_outcome_and_service(
    web: WebApp, seed: Store, query: str, subjects: set[str]
) -> None:
    page_for(seed, "New case")
    seed.accept([mail("l", raw=b"Subject: Lunch\r\n\r\n")])
    seed.accept([mail("o", ("other",), raw=b"Subject: Other service\r\n\r\n")])
    lunch = next(j.id for j in seed.pending_jobs() if j.service == "helpdesk")
    with seed.transaction():
        seed.finish_job(JobDecision(lunch, outcome="unmatched", reason="no rule"))
    page = get(web, "/" + query)
    rows = re.findall(r'<tr class="message">.*?</tr>', page, re.S)
    shown = {s for s in ("New case", "Lunch", "Other service") for r in rows if f">{s}<" in r}
    assert shown == subjects


@pytest.mark.parametrize(
    ("query", "words"),
    [
        pytest.param(
            "?outcome=triggerd", "unknown outcome 'triggerd': use one of triggered", id="typo"
        ),
        pytest.param(
            "?service=helpdsk",
            "unknown service 'helpdsk': configured are helpdesk, other",
            id="service",
        ),
        pytest.param("?service=a&service=b", "give at most one service", id="two-services"),
        pytest.param("?hours=5", "hours must be one of 1, 6, 24", id="hours"),
        pytest.param("?hours=" + "9" * 500, "hours must be one of 1, 6, 24", id="long"),
    ],
)
def test_bad_filters_get_a_clear_400(web: WebApp, query: str, words: str) -> None:
    response = call(web, "GET", "/" + query)
    assert response.status_code == 400 and words in response.text
    assert "Traceback" not in response.text and len(response.text) < 1000


def test_the_window_can_be_narrowed_to_an_hour(web: WebApp, seed: Store) -> None:
    page_for(seed, "Recent")
    page = get(web, "/?hours=1")
    assert "Mail per minute, last 1 h" in page and bars(page) == {"triggered": 1}
    widths = re.findall(r'<rect class="bar triggered" x="[\d.]+" y="[\d.]+" width="([\d.]+)"', page)
    assert widths == ["23"]  # 24 units a minute, one left as a gap


def test_the_incident_page_shows_each_mail_decision_attempt_and_answer(
    web: WebApp, seed: Store
) -> None:
    paged = page_for(seed, "Printer on fire", results=(failed("HTTP 503: busy"), dead()))
    seed.requeue_outbox(paged.item)
    seed.record_outbox([OutboxResult(paged.item, "done", response='{"status":"success"}')])
    page = get(web, "/incident?service=helpdesk&key=Printer+on+fire")
    rows = re.findall(r'<tr class="moment (\w+)">(.*?)</tr>', page, re.S)
    moments = [unescape(re.sub(r"<[^>]+>|\s+", " ", text)).strip() for _, text in rows]
    assert [what for what, _ in rows] == [
        "mail",
        "decision",
        "queued",
        "attempt",
        "attempt",
        "attempt",
        "attempt",
    ]
    text = " | ".join(moments)
    assert f"message {paged.message} via test: Printer on fire" in text
    assert "triggered by rule 'new case'" in text
    assert (
        "attempt 1: PagerDuty trigger 'Printer on fire' failed, will retry: HTTP 503: busy" in text
    )
    assert "attempt 2: PagerDuty trigger 'Printer on fire' NOT DELIVERED (dead letter)" in text
    assert "re-queued by an operator" in text
    assert (
        """attempt 3: PagerDuty trigger 'Printer on fire' delivered, answer {"status":"success"}"""
        in text
    )
    assert ">delivered" in page


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("", 400, id="nothing"),
        pytest.param("?service=helpdesk", 400, id="no-key"),
        pytest.param("?service=helpdesk&key=nope", 404, id="unknown"),
    ],
)
def test_the_incident_page_needs_a_known_incident(web: WebApp, query: str, status: int) -> None:
    assert call(web, "GET", "/incident" + query).status_code == status


def test_the_outbox_page_shows_attempts_and_links_back(web: WebApp, seed: Store) -> None:
    paged = page_for(seed, "Printer on fire", results=(dead("HTTP 400: bad key"),))
    page = get(web, f"/outbox/{paged.item}")
    assert "NOT DELIVERED (dead letter)" in page and "HTTP 400: bad key" in page
    assert f'href="/messages/{paged.message}#job-{paged.job}"' in page
    assert 'href="/incident?service=helpdesk&amp;key=Printer+on+fire"' in page
    assert 'action="/outbox/1/retry"' in page  # a token is configured
    assert call(web, "GET", "/outbox/77").status_code == 404


def test_hostile_incident_keys_are_escaped_everywhere(web: WebApp, seed: Store) -> None:
    key = '<script>alert(1)</script>"&'
    page_for(seed, key, results=(dead("<img src=x onerror=alert(1)>"),))
    for path in ("/", f"/incident?service=helpdesk&key={quote(key)}", "/outbox/1", "/messages/1"):
        page = get(web, path)
        assert "<script>alert" not in page and "<img src=x" not in page, path


def test_the_page_is_compressed_and_keeps_its_security_headers(web: WebApp) -> None:
    response = call(web, "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "<h1>Email gateway</h1>" in response.text  # httpx decoded it
    plain = call(web, "GET", "/", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and "<h1>Email gateway</h1>" in plain.text


# -- issue 13: several nodes share one store ----------------------------------------------------


def test_the_message_page_names_the_node_that_accepted_and_the_one_that_delivered(
    web: WebApp, seed: Store
) -> None:
    set_node("mx1")
    try:
        paged = page_for(seed, "Printer on fire")
        set_node("mx2")
        [claimed] = seed.claim_outbox(time.time(), 1, None, 60.0, owner="mx2:1")
        seed.record_outbox([OutboxResult(claimed.id, "done", response="202")])
    finally:
        set_node("")
    page = unescape(get(web, f"/messages/{paged.message}"))
    assert re.search(r"accepted by</th><td[^>]*>node mx1<", page), page
    assert "delivered by node mx2" in page
