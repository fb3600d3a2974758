"""Mail content is hostile: control characters never reach a terminal or a log unescaped, and a
request body cannot crash the web listener by nesting.

`gateway.display.printable` is the one function every human-facing output uses (CLI tables
and text in tests/test_cli_listings.py; log lines here)."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import OutgoingSettings, WebSettings
from gateway.display import json_line, printable
from gateway.logs import HumanFormatter, JsonFormatter
from gateway.store import StoreThread
from gateway.web.notify import MAX_DEPTH, NotifyEndpoint
from gateway.web.status import WebApp
from tests.conftest import ROOT, GatewayProcess, desk_mail, wait_until, write_config
from tests.net import free_port

# -- printable / json_line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("Printer on fire", "Printer on fire", id="plain"),
        pytest.param("Café – “urgent” 回复", "Café – “urgent” 回复", id="unicode-kept"),
        pytest.param("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m", id="csi"),
        pytest.param("a\x00b\x07c\x7fd", "a\\x00b\\x07c\\x7fd", id="nul-bel-del"),
        pytest.param("x\x9b2Jy", "x\\x9b2Jy", id="c1-csi"),
        pytest.param("one\ntwo\rthree\tfour", "one\\ntwo\\rthree\\tfour", id="line-breaks"),
        pytest.param("a\u2028b\u2029c\x85d", "a\\u2028b\\u2029c\\x85d", id="unicode-breaks"),
        pytest.param("evil\u202etxt.exe", "evil\\u202etxt.exe", id="bidi-override"),
        pytest.param("bad\udcffbyte", "bad\\udcffbyte", id="lone-surrogate"),
        pytest.param("C:\\x1b is text", "C:\\x1b is text", id="backslash-kept"),
    ],
)
def test_printable_escapes_every_control_character(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert printable(shown) == shown  # nothing left to escape
    printable(text).encode("utf-8")  # a lone surrogate would make printing raise


def test_printable_can_keep_newlines_for_multi_line_messages() -> None:
    assert printable("a\nb\r\x1b", keep_newlines=True) == "a\nb\\r\\x1b"


def test_json_line_is_valid_json_without_raw_controls() -> None:
    value = {"subject": "x\x1b\x9b\u2028\udcffé\x00", "n": 1}
    line = json_line(value)
    assert "\n" not in line and line.isprintable()
    assert json.loads(line) == value
    assert "é" in line  # readable, not \u00e9


# -- log lines -------------------------------------------------------------------------------------


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, None)


def test_human_log_lines_escape_mail_data_and_cannot_be_forged() -> None:
    sender = "evil\x00@x\r\n10:00:00 ERROR   gateway.fake: forged"
    line = HumanFormatter().format(record("smtp: from=<%s> subject=%s", sender, "\x1b]0;t\x07"))
    assert "\x00" not in line and "\x1b" not in line and "\r" not in line
    assert "evil\\x00@x\\r" in line and "\\x1b]0;t\\x07" in line
    continuation = line.splitlines()[1]
    assert continuation.startswith("    10:00:00 ERROR")  # indented: not a record of its own


def test_human_log_keeps_multi_line_messages_and_tracebacks_readable() -> None:
    try:
        raise ValueError("bad \x1b[2J value")
    except ValueError:
        entry = record("reload refused:\n%s", "a.toml:1: x\nb.toml:2: y")
        entry.exc_info = sys.exc_info()
    lines = HumanFormatter().format(entry).splitlines()
    assert lines[0].endswith("reload refused:") and lines[1] == "    a.toml:1: x"
    assert lines[-1] == "    ValueError: bad \\x1b[2J value"
    assert all(line.startswith("    ") for line in lines[1:])


def test_json_log_lines_escape_c1_controls_and_stay_valid_json() -> None:
    entry = record("from=<%s>", "a\x00\x9b\u2028b@x")
    entry.__dict__["sender"] = "a\x00\x9b\u2028b@x"
    line = JsonFormatter().format(entry)
    assert line.isprintable()
    parsed = json.loads(line)
    assert parsed["sender"] == "a\x00\x9b\u2028b@x" and parsed["msg"] == "from=<a\x00\x9b\u2028b@x>"


def test_nul_and_escapes_in_mail_from_never_reach_the_log_raw(tmp_path: Path) -> None:
    port = free_port()
    gateway = GatewayProcess(write_config(tmp_path, routing_key=None, smtp_port=port), port)
    gateway.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            assert client.docmd("MAIL FROM:<ev\x00il\x1b@x.example>")[0] == 250
            client.rcpt("desk@gateway.example")
            client.data(desk_mail("Printer on fire"))
        wait_until(lambda: "outcome=triggered" in gateway.output())
    finally:
        gateway.stop()
    log = gateway.output()
    assert "\x00" not in log and "\x1b" not in log
    escaped = ("from=<ev\\x00il\\x1b@x.example>", "ev\\u0000il\\u001b@x.example")  # human, JSON
    assert any(form in log for form in escaped), log


# -- POST /notify: nesting -------------------------------------------------------------------------


def arrays(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested(depth: int) -> bytes:
    """A case object whose `data` nests arrays so the whole body is `depth` levels deep."""
    return f'{{"subject": "x", "data": {arrays(depth - 1)}}}'.encode()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[WebApp]:
    store = StoreThread(tmp_path / "gateway.sqlite3", "notify-test")
    web = WebApp(store, WebSettings())
    web.notify = NotifyEndpoint(
        store, ROOT / "templates", OutgoingSettings(from_addr="gw@gateway.test"), "token"
    )
    yield web
    store.close()


def post(app: WebApp, body: bytes) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            headers = {"Authorization": "Bearer token"}
            return await client.post("/notify/case_new", content=body, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 30_000])
def test_deeply_nested_json_to_notify_is_refused_with_400(notify: WebApp, depth: int) -> None:
    response = post(notify, nested(depth))
    assert response.status_code == 400
    assert f"nested deeper than {MAX_DEPTH} levels" in response.text
    assert "Traceback" not in response.text


def test_json_nested_within_the_limit_is_still_a_case(notify: WebApp) -> None:
    case = json.loads((ROOT / "tests" / "fixtures" / "case29.json").read_text())
    body = json.dumps({**case, "data": json.loads(arrays(MAX_DEPTH - 1))}).encode()
    assert post(notify, body).status_code == 202
