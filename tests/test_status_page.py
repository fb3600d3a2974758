"""The status page in headless Chromium (Debian's `chromium`, driven by Playwright's Python API):
after a scripted run it lists the triggered incident and the dead letter, the message links to
its rule trace, and the retry button (with the token) re-queues the dead letter for delivery;
the charts are really painted and show the counts that were sent; an incident links to its
timeline."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import desk_mail, wait_until
from tests.ops_support import WebGateway, running, web_config
from tests.pdserver import PagerDutyStandIn

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "status-page-token"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _sync_playwright() -> Any:
    """Playwright and Chromium are required in CI (.ci/run installs them); skipped elsewhere."""
    in_ci = bool(os.environ.get("CI"))  # as tests/dovecot.py: CI must run these, not skip
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        if in_ci:
            pytest.fail(f"{CHROMIUM} missing in CI (.ci/run installs chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return sync_playwright


@pytest.fixture
def page() -> Iterator[Any]:
    with _sync_playwright()() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.fixture
def gateway(tmp_path: Path, pd: PagerDutyStandIn) -> Iterator[WebGateway]:
    config, port, web_port = web_config(tmp_path, pd.url, token=TOKEN)
    with running(config, port, web_port) as gateway:
        yield gateway


def test_status_page_lists_incident_and_dead_letter_and_retries_it(
    page: Any, gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(1, 400)  # PagerDuty rejects the first event: it becomes a dead letter
    gateway.send(desk_mail("Printer on fire"))
    wait_until(lambda: "dead-letter" in gateway.get("/")[1], message=gateway.output())

    page.goto(gateway.base + "/", timeout=15000)
    incident = page.locator("tr.incident")
    assert incident.count() == 1
    assert "Printer on fire" in incident.inner_text()
    assert "triggered" in incident.inner_text()
    dead = page.locator("tr.dead-letter")
    assert dead.count() == 1
    assert "trigger Printer on fire" in dead.inner_text()

    page.click("tr.message a")  # click through to the parsed view and the rule trace
    page.wait_for_selector("#trace")
    assert page.locator("tr.trace-step").count() >= 2
    assert "new case" in page.locator("#trace + table").inner_text()
    assert "Printer on fire" in page.locator("#parsed + table").inner_text()

    page.goto(gateway.base + "/", timeout=15000)
    page.fill("tr.dead-letter input[name=token]", TOKEN)
    page.click("tr.dead-letter button")
    page.wait_for_selector("#notice")
    assert "re-queued" in page.inner_text("#notice")
    (event,) = pd.wait_for(1)
    assert (event["event_action"], event["dedup_key"]) == ("trigger", "Printer on fire")

    def no_dead_letters() -> bool:
        page.goto(gateway.base + "/", timeout=15000)
        return page.locator("tr.dead-letter").count() == 0

    wait_until(no_dead_letters, timeout=10, interval=0.2)


def test_status_page_chart_renders_and_matches_the_counts(
    page: Any, gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    redelivered = desk_mail("Lunch menu", "Whatever", message_id="<lunch@helpdesk.example>")
    for mail in (
        desk_mail("Printer on fire"),  # triggered
        desk_mail("Disk full"),  # triggered
        desk_mail("Disk full"),  # a repeat trigger for the open incident: duplicate
        desk_mail("Printer on fire", "Resolved"),  # resolved
        redelivered,  # no rule matches: unmatched
        redelivered,  # the same mail again: duplicate (redelivered)
    ):
        gateway.send(mail)
    pd.wait_for(3)  # trigger, trigger, resolve (issue 12: the repeat is coalesced, not sent)
    expected = {
        "triggered": 2,
        "duplicate": 2,
        "resolved": 1,
        "unmatched": 1,
        "quarantined": 0,
        "other": 0,
    }
    wait_until(lambda: "events delivered: 3" in gateway.get("/")[1], message=gateway.output())

    page.goto(gateway.base + "/", timeout=15000)
    chart = page.locator("svg#mail-chart")
    box = chart.bounding_box()
    assert box is not None and box["width"] > 1000 and box["height"] > 150  # drawn, full size
    for category, count in expected.items():
        bars = page.locator(f"svg#mail-chart rect.bar.{category}")
        shown = sum(int(bars.nth(n).get_attribute("data-count")) for n in range(bars.count()))
        assert shown == count, category
        for n in range(bars.count()):  # every bar is really painted, not zero-sized
            painted = bars.nth(n).bounding_box()
            assert painted is not None and painted["height"] > 0 and painted["width"] > 0
        legend = page.locator(f'#mail-legend li[data-category="{category}"]')
        assert legend.get_attribute("data-total") == str(count)
        assert legend.inner_text().strip() == f"{category}: {count}"

    points = page.locator("svg#latency-chart circle.p99")
    assert points.count() >= 1 and points.first.bounding_box() is not None
    assert "events delivered: 3" in page.inner_text("#latency-legend")
    title = points.first.locator("title").text_content()
    assert re.fullmatch(r"\d\d:\d\d \S+: \d event\(s\) delivered, p50 .+, p99 .+", title or "")


def test_status_page_links_an_incident_to_its_timeline(
    page: Any, gateway: WebGateway, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(1, 400)  # the trigger is refused: a dead letter, NOT paged
    gateway.send(desk_mail("Printer on fire"))
    wait_until(lambda: "dead-letter" in gateway.get("/")[1], message=gateway.output())
    page.goto(gateway.base + "/", timeout=15000)
    row = page.locator("tr.incident")
    assert "NOT DELIVERED" in row.locator("td.delivery").inner_text()
    row.locator("a", has_text="Printer on fire").click()
    page.wait_for_selector("#timeline")
    moments = page.locator("tr.moment")
    whats = [moments.nth(n).locator("td").nth(1).inner_text() for n in range(moments.count())]
    assert whats == ["mail", "decision", "queued", "attempt"]
    assert "NOT DELIVERED (dead letter): HTTP 400" in moments.nth(3).inner_text()
