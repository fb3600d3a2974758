"""The two places where the gateway reaches into uvicorn beyond `Config`: fenced here.

uvicorn answers a few requests itself, before any ASGI app runs, and its answers do not fit a
hardened listener: every refusal is a bare 400 (h11's "head too large" included, which is a
431), it carries none of the security headers, and a connection that never completes its head
is never timed out (`timeout_keep_alive` starts only after a first response). `GatewayProtocol`
subclasses uvicorn's h11 protocol to:

- answer protocol errors with the status h11 means (`error_status_hint`: 431 for a head over
  `h11_max_incomplete_event_size`) and the security headers (`send_400_response`);
- answer 408 when the request head is not complete within `Limits.request_timeout`;
- answer 503 at once to a connection over `Limits.max_connections` (instead of uvicorn's
  `limit_concurrency` answer, which lacks the security headers);
- disconnect a client that stops reading its answer for `Limits.write_timeout`.

`EmbeddedServer` is a `uvicorn.Server` that leaves the process's signals alone: the gateway's
service owns SIGTERM/SIGINT/SIGHUP, and uvicorn's `capture_signals` would replace them.

`check_upstream()` runs at import and names any member that uvicorn no longer has; the tests in
tests/test_web_server.py fail when uvicorn's behaviour behind these members changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.web.hardening import Limits, plain_answer

# (class, member): what this module overrides or reads, checked against the installed uvicorn
RELIED_ON = (
    (H11Protocol, "send_400_response"),  # called inside `except h11.RemoteProtocolError`
    (H11Protocol, "connection_made"),
    (H11Protocol, "connection_lost"),
    (H11Protocol, "pause_writing"),
    (H11Protocol, "resume_writing"),
    (uvicorn.Server, "capture_signals"),  # uvicorn >= 0.29
)


def check_upstream() -> None:
    missing = [f"{cls.__name__}.{name}" for cls, name in RELIED_ON if not hasattr(cls, name)]
    if missing:
        raise ImportError(
            f"uvicorn {uvicorn.__version__} lacks {', '.join(missing)}: "
            "update gateway/web/uvicorn_compat.py"
        )


check_upstream()


class GatewayProtocol(H11Protocol):
    """uvicorn's h11 protocol with the gateway's own answers; `with_limits` sets the limits."""

    limits = Limits()

    @classmethod
    def with_limits(cls, limits: Limits) -> type[GatewayProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "busy\n")  # answer cheaply instead of queueing
            return
        self._timers["head"] = self.loop.call_later(self.limits.request_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers.values():
            timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside `except h11.RemoteProtocolError`, whose hint is the status
        hint = getattr(sys.exc_info()[1], "error_status_hint", 400)
        status = hint if isinstance(hint, int) and 400 <= hint < 600 else 400
        self._refuse(status, f"{HTTPStatus(status).phrase.lower()}\n")

    def pause_writing(self) -> None:
        super().pause_writing()
        if "write" not in self._timers:
            self._timers["write"] = self.loop.call_later(
                self.limits.write_timeout, self.transport.abort
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        timer = self._timers.pop("write", None)
        if timer is not None:
            timer.cancel()

    def _head_late(self) -> None:
        if self.cycle is None:  # uvicorn starts a cycle once a whole request head arrived
            self._refuse(408, "request timeout\n")

    def _refuse(self, status: int, text: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(plain_answer(status, text))
            self.transport.close()


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server on a loop it does not own: the gateway handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
