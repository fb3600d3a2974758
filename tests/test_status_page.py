"""The status page in headless Chromium (Debian's `chromium`, driven by Playwright's Python API):
after a scripted run it lists the triggered incident and the dead letter, the message links to
its rule trace, and the retry button (with the token) re-queues the dead letter for delivery."""

from __future__ import annotations

import os
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
