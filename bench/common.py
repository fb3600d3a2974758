"""Helpers shared by the benchmarks: the bare aiosmtpd baseline, smtp-source runs, waiting for ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.runtime.loop import run_event_loop
from tests.net import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@dataclass(frozen=True)
class LoadResult:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def smtp_source(
    port: int,
    *,
    messages: int,
    sessions: int = 16,
    size: int = 3072,
    persistent: bool = False,
    to: str = "desk@gateway.example",
) -> LoadResult:
    """Postfix's load generator; `persistent` sends every message of a session on one connection."""
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(binary).exists():
        raise SystemExit("smtp-source not found: apt-get install postfix (it ships smtp-source)")
    args = [
        binary,
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "bench@helpdesk.example",
        "-t",
        to,
    ]
    if persistent:
        args.append("-d")
    started = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return LoadResult(messages, time.perf_counter() - started)


class BareSmtpd:
    """The bare aiosmtpd baseline in its own process (like the gateway is)."""

    def __enter__(self) -> BareSmtpd:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bare_smtpd.py"), str(self.port)], stdout=subprocess.DEVNULL
        )
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def serve_on_port(serve: Callable[[int], Awaitable[None]]) -> None:
    """Run `serve(port)` (port from argv) on the gateway's own event loop runner."""
    run_event_loop(serve(int(sys.argv[1])))
