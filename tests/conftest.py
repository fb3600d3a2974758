"""Shared fixtures: a PagerDuty stand-in, config files in tmp_path, Desk.com-style mail, and a
real `gateway serve` process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from tests.net import free_port
from tests.pdserver import PagerDutyStandIn
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "parsing_rules"
ROUTING_KEY = "R0123456789abcdef0123456789abcde"  # 32 characters, like an integration key


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.02, message: str = ""):
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s")
        time.sleep(interval)


def desk_mail(
    subject: str,
    status: str = "New",
    *,
    message_id: str | None = None,
    to: str = "desk@gateway.example",
    sender: str = "support@helpdesk.example",
    extra: str = "",
) -> bytes:
    """A Desk.com-style 'send notification email' message."""
    msg = EmailMessage()
    msg["From"] = f"Helpdesk <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="helpdesk.example")
    msg.set_content(
        f"Case #29 has been updated.\n\nStatus: {status}\nPriority: 5\n"
        f"Requester: Jane Customer <jane@customer.example>\n{extra}"
    )
    return msg.as_bytes()


def write_config(
    directory: Path,
    *,
    pd_url: str | None = None,
    routing_key: str | None = ROUTING_KEY,
    smtp_port: int | None = None,
    smtp_extra: str = "",
    service_extra: str = "",
    extra: str = "",
) -> Path:
    """A config.toml in `directory` using the repository's default rules. The PagerDuty rate
    limit is off (the stand-in has none, and tests send thousands of events); tests of the
    limit switch it on."""
    key_line = f'routing_key = "{routing_key}"' if routing_key else ""
    url_line = f'events_url = "{pd_url}"' if pd_url else ""
    text = f"""
[gateway]
data_dir = "data"
rules_dir = "{RULES_DIR.as_posix()}"
templates_dir = "{(ROOT / "templates").as_posix()}"
log_level = "info"
log_format = "human"

[smtp]
listen = ["127.0.0.1:{smtp_port or free_port()}"]
hostname = "gateway.test"
{smtp_extra}

[pagerduty]
{url_line}
timeout_seconds = 5
rate_limit_per_minute = 0

[[service]]
name = "helpdesk"
addresses = ["desk@*"]
rules = ["helpdesk.toml"]
{key_line}
{service_extra}
{extra}
"""
    if "[web]" not in extra:  # concurrent test gateways must not fight over port 8025
        text += '\n[web]\nlisten = ""\n'
    path = directory / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture
def pd() -> Iterator[PagerDutyStandIn]:
    server = PagerDutyStandIn().start()
    yield server
    server.stop()


class GatewayProcess:
    """`gateway serve` as a real child process, so tests can SIGTERM or kill -9 it."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "gateway.log"

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )
        wait_until(self._listening, timeout, message=f"gateway did not listen:\n{self.output()}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.recv(100)  # the 220 greeting: the listener is really serving
            return True
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def gateway_process(tmp_path: Path, pd: PagerDutyStandIn) -> Iterator[GatewayProcess]:
    port = free_port()
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port)
    process = GatewayProcess(config, port)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()
