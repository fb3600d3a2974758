"""The systemd notify protocol (sd_notify(3)): READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (an abstract socket when it starts with ``@``), so it is written here rather
than pulled in as a dependency. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class ServiceManager:
    """Sends notify messages; never raises (a lost notification must not stop the gateway)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; True when it was handed to the socket."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", lines[0] if lines else "", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd >= 253 wants the monotonic time with RELOADING=1 (Type=notify-reload)
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Ping WATCHDOG=1 at half the interval from the event loop: a hung loop stops pings."""
        if self.address is None or self.watchdog_seconds is None:
            return
        interval = self.watchdog_seconds / 2
        while not stop.is_set():
            self.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; ignored", value)
    return None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC in seconds, if the watchdog is meant for this process (WATCHDOG_PID)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
