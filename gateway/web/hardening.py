"""What every answer of the web listener must satisfy, as two small pure-ASGI middlewares.

The pages show hostile content (mail subjects, bodies, HTML), so every response carries a
Content-Security-Policy without scripts and the usual companions; every connection serves one
request (`Connection: close`), as the old hand-written server did, so each request's limits
start from a fresh connection. `RequestLimits` refuses what is too big or too slow before any
route sees it: 431 for a request head over `max_header_bytes` or `max_header_count`, 413 for a
body over `max_body_bytes` (announced or streamed), 408 for a body that does not arrive within
`request_timeout`. The head itself is bounded in time and size by the HTTP protocol
(`gateway.web.uvicorn_compat`), which answers with `plain_answer` below.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Tunables: small defaults, since nothing legitimate sends big requests here."""

    max_header_bytes: int = 16 * 1024
    max_header_count: int = 100
    max_body_bytes: int = 64 * 1024
    max_connections: int = 64
    request_timeout: float = 10.0  # for the head, and again for the body: slowloris gets 408
    write_timeout: float = 30.0  # a client that stops reading the answer is disconnected
    # paths allowed a bigger body: PagerDuty's webhooks are best effort up to 256 KB
    path_body_bytes: tuple[tuple[str, int], ...] = (("/pagerduty/webhook", 256 * 1024),)

    def body_limit(self, path: str) -> int:
        return dict(self.path_body_bytes).get(path, self.max_body_bytes)


SECURITY_HEADERS = {
    # mail content is hostile: no scripts, no remote anything, no framing
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# canonical spelling on the wire (names are case-insensitive, but people grep for these)
_EXTRA_HEADERS = [
    (name.encode("latin-1"), value.encode("latin-1"))
    for name, value in {**SECURITY_HEADERS, "Connection": "close"}.items()
]


def plain_answer(status: int, text: str) -> bytes:
    """A whole HTTP/1.1 answer for the protocol's own refusals, sent before closing."""
    body = text.encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


class SecureResponses:
    """Outermost: security headers and `Connection: close` on every answer, and a logged 500
    (never a stack trace to the client, never uvicorn's own traceback) for a handler that fails."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [h for h in _EXTRA_HEADERS if h[0].lower() not in present]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, secured)
        except Exception:
            log.exception("web: %s %s failed", scope.get("method"), scope.get("path"))
            if not started:
                answer = PlainTextResponse("internal error (see the gateway log)\n", 500)
                await answer(scope, receive, secured)


class RequestLimits:
    """Reads the (small) body up front, within its size and time limits, then runs the app
    with the body replayed; refuses oversized heads the protocol has already parsed."""

    def __init__(self, app: ASGIApp, limits: Limits | None = None) -> None:
        self.app = app
        self.limits = limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._check_head(scope)
        body = None
        if refusal is None:
            try:
                async with asyncio.timeout(self.limits.request_timeout):
                    body = await self._read_body(receive, self.limits.body_limit(scope["path"]))
            except TimeoutError:
                refusal = PlainTextResponse("request timeout\n", 408)
            except _TooLarge:
                refusal = _too_large()
        if refusal is not None:
            await refusal(scope, receive, send)
        elif body is not None:  # None: the client went away, nobody to answer
            await self.app(scope, _replay(body, receive), send)

    def _check_head(self, scope: Scope) -> PlainTextResponse | None:
        # h11 bounds only a head that is still incomplete; a complete one is measured here
        headers = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size > self.limits.max_header_bytes or len(headers) > self.limits.max_header_count:
            return PlainTextResponse("request header fields too large\n", 431)
        length = Headers(scope=scope).get("content-length")
        if length is None or (
            length.isascii()
            and length.isdigit()
            and int(length) <= self.limits.body_limit(scope["path"])
        ):
            return None
        return _too_large()

    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise _TooLarge
            if not message.get("more_body", False):
                return bytes(body)


class _TooLarge(Exception):
    pass


def _too_large() -> PlainTextResponse:
    return PlainTextResponse("request body too large\n", 413)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the server's own messages (the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
