"""A small, hardened HTTP/1.1 server on asyncio streams and h11 (the parser httpx uses).

Only what an operator's health checks, Prometheus and a browser need: one request per
connection, bounded everything (header bytes, body bytes, connections, time), and a
deliberate answer for every malformed request. Routes live in `gateway.web`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

from gateway.config import split_hostport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Tunables: small defaults, since nothing legitimate sends big requests here."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    max_connections: int = 64
    request_timeout: float = 10.0  # for the whole request: slowloris gets 408
    write_timeout: float = 30.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""

    def form(self) -> dict[str, str]:
        """application/x-www-form-urlencoded body -> first value per name."""
        text = self.body.decode("utf-8", errors="replace")
        return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]

SECURITY_HEADERS = {
    # mail content is hostile: no scripts, no remote anything, no framing
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class HttpError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class HttpServer:
    """`await start()` binds `listen` (host:port); `await close()` stops it."""

    def __init__(self, listen: str, handler: Handler, limits: Limits | None = None) -> None:
        self.listen = listen
        self.handler = handler
        self.limits = limits or Limits()
        self.bound: list[tuple[str, int]] = []
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(self.limits.max_connections)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        host, port = split_hostport(self.listen)
        self._server = await asyncio.start_server(
            self._connection, host or None, port, limit=self.limits.max_header_bytes
        )
        self.bound = [sock.getsockname()[:2] for sock in self._server.sockets]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._slots.locked():  # over the limit: answer cheaply instead of queueing
                await self._send(writer, h11.Connection(h11.SERVER), _text(503, "busy\n"))
                return
            async with self._slots:
                await self._serve_one(reader, writer)
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            request = await asyncio.wait_for(
                self._read_request(conn, reader), self.limits.request_timeout
            )
        except TimeoutError:
            response = _text(408, "request timeout\n")
        except HttpError as exc:
            response = _text(exc.status, f"{exc}\n")
        except h11.RemoteProtocolError as exc:
            response = _text(exc.error_status_hint, "bad request\n")
        else:
            response = await self._respond(request)
            if request.method == "HEAD":
                response = Response(response.status, b"", response.content_type, response.headers)
        await self._send(writer, conn, response)

    async def _respond(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except HttpError as exc:
            return _text(exc.status, f"{exc}\n")
        except Exception:
            log.exception("web: %s %s failed", request.method, request.path)
            return _text(500, "internal error (see the gateway log)\n")

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Request:
        event = await _next_event(conn, reader)
        if not isinstance(event, h11.Request):
            raise HttpError(400, "bad request")
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.limits.max_header_bytes:  # h11 only bounds requests still incomplete
            raise HttpError(431, "request header fields too large")
        headers = _headers(event.headers)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limits.max_body_bytes:
            raise HttpError(413, "request body too large")
        body = bytearray()
        while True:
            part = await _next_event(conn, reader)
            if isinstance(part, h11.EndOfMessage):
                break
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.limits.max_body_bytes:
                    raise HttpError(413, "request body too large")
        target = urlsplit(event.target.decode("ascii", errors="replace"))
        return Request(
            method=event.method.decode("ascii"),
            path=target.path or "/",
            query=parse_qs(target.query),
            headers=headers,
            body=bytes(body),
        )

    async def _send(
        self, writer: asyncio.StreamWriter, conn: h11.Connection, response: Response
    ) -> None:
        if conn.their_state is h11.ERROR or conn.our_state is not h11.SEND_RESPONSE:
            # h11 refuses to answer a request it could not parse; answer it ourselves
            conn = _fresh_connection()
        headers = {
            **SECURITY_HEADERS,
            **response.headers,
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Connection": "close",
        }
        reason = HTTPStatus(response.status).phrase.encode()
        head = h11.Response(
            status_code=response.status, headers=list(headers.items()), reason=reason
        )
        data = conn.send(head)
        data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                raise HttpError(400, "incomplete request")
            return event
        conn.receive_data(await reader.read(65536))


def _fresh_connection() -> h11.Connection:
    """A server connection that has 'received' a minimal request, so it may send a response."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    return conn


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode())
