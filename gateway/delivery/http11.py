"""A lean HTTP/1.1 keep-alive transport for httpx: the PagerDuty sender's connection to the API.

httpx stays the API (`httpx.Request`, `httpx.Response`, timeouts, exception types); only the
layer under it changes. httpx's default transport (httpcore over anyio) cost about 0.6 ms of CPU per
small POST on loopback, most of it generic machinery: an async-library lookup on every lock and
cancellation shield (an import search when sniffio is absent), anyio stream wrappers, pool
bookkeeping that scans every connection per request, and headers and body written in two sends.
The gateway sends small JSON events to one origin, over and over; this transport does only
that, on asyncio streams, with h11 (httpcore's own HTTP/1.1 parser) reading the responses:

* one connection per request in flight, kept alive and reused (most recently used first);
* an idle connection is dropped once the server closed it or after `keepalive_expiry`; if the
  server closes it just as it is reused (before answering anything), the request is sent once
  more on a new connection: the race every keep-alive client meets;
* the request goes out in one write; the response is read whole (up to `max_response_bytes`);
* httpx's per-request timeouts apply: connect, write, and read (for the whole response);
* failures raise httpx's own exceptions (`ConnectError`, `ReadTimeout`, ...), so callers map
  them exactly as before.

No HTTP/2, no proxies, no streaming bodies: `build_transport` falls back to httpx's own client
when the environment names a proxy for the URL (HTTPS_PROXY and friends, as httpx honours them).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import httpx

KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept (httpx's default too)
MAX_IDLE_PER_ORIGIN = 32
MAX_RESPONSE_BYTES = 1 << 20  # an Events API answer is a few hundred bytes
READ_CHUNK = 65536

Origin = tuple[str, str, int]  # scheme, host, port


@dataclass
class _Timeouts:
    connect: float | None
    write: float | None
    read: float | None

    @classmethod
    def of(cls, request: httpx.Request) -> _Timeouts:
        given = request.extensions.get("timeout", {})
        return cls(given.get("connect"), given.get("write"), given.get("read"))


@contextlib.contextmanager
def _mapped(
    request: httpx.Request, timeout: type[httpx.TimeoutException], error: type[httpx.HTTPError]
) -> Iterator[None]:
    """asyncio and h11 failures as the httpx exceptions a caller of any transport expects."""
    try:
        yield
    except TimeoutError as exc:
        raise timeout(f"{timeout.__name__} talking to {request.url.host}", request=request) from exc
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
        raise error(str(exc) or type(exc).__name__, request=request) from exc


class _Connection:
    """One TCP (or TLS) connection and its HTTP/1.1 state; used by one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self.idle_since = time.monotonic()
        self.answered = False  # any byte of a response arrived on this connection

    def reusable(self, now: float, expiry: float) -> bool:
        """False once the server hung up (the loop saw EOF) or the connection sat idle too long."""
        return (
            self.h11.our_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
            and now - self.idle_since < expiry
        )

    def close(self) -> None:
        self.writer.close()

    async def exchange(
        self, request: httpx.Request, body: bytes, timeouts: _Timeouts
    ) -> tuple[h11.Response, bytes]:
        """Send the request in one write and read the whole response."""
        with _mapped(request, httpx.WriteTimeout, httpx.WriteError):
            self.writer.write(self._serialise(request, body))
            async with asyncio.timeout(timeouts.write):
                await self.writer.drain()
        with _mapped(request, httpx.ReadTimeout, httpx.ReadError):
            async with asyncio.timeout(timeouts.read):
                return await self._read_response(request)

    def _serialise(self, request: httpx.Request, body: bytes) -> bytes:
        target = request.url.raw_path
        head = h11.Request(method=request.method, target=target, headers=request.headers.raw)
        out = self.h11.send(head) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        return out + (self.h11.send(h11.EndOfMessage()) or b"")

    async def _read_response(self, request: httpx.Request) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_CHUNK)
                self.answered = self.answered or bool(data)
                self.h11.receive_data(data)  # b"": EOF, which ends a close-delimited body
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise httpx.RemoteProtocolError(
                        f"response body over {MAX_RESPONSE_BYTES} bytes", request=request
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError(
                    "server disconnected without sending a response", request=request
                )
            # h11.InformationalResponse (100 Continue): nothing to do, read on

    def finish(self) -> bool:
        """After a complete exchange: ready for the next request (True) or to be closed."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.idle_since = time.monotonic()
            self.answered = False
            return True
        return False


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive for `httpx.AsyncClient(transport=...)`; see the module docstring."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
    ) -> None:
        self.ssl_context = ssl_context
        self.keepalive_expiry = keepalive_expiry
        self.max_idle = max_idle
        self._idle: dict[Origin, list[_Connection]] = {}
        self.connections_opened = 0  # for tests and diagnostics: keep-alive shows as reuse

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        body = await request.aread()
        timeouts = _Timeouts.of(request)
        idle = self._take_idle(origin)
        if idle is not None:
            try:
                return await self._exchange(origin, idle, request, body, timeouts)
            except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
                if idle.answered:
                    raise
                # The server closed the idle connection as we reused it (its keep-alive
                # timeout): nothing was answered, so the request goes once more on a new one.
        connection = await self._connect(origin, request, timeouts)
        return await self._exchange(origin, connection, request, body, timeouts)

    async def _exchange(
        self,
        origin: Origin,
        connection: _Connection,
        request: httpx.Request,
        body: bytes,
        timeouts: _Timeouts,
    ) -> httpx.Response:
        try:
            head, content = await connection.exchange(request, body, timeouts)
        except BaseException:  # cancelled or failed half-way: the connection's state is unknown
            connection.close()
            raise
        if connection.finish():
            self._put_idle(origin, connection)
        else:
            connection.close()
        return httpx.Response(
            head.status_code,
            headers=head.headers,
            stream=httpx.ByteStream(content),
            extensions={"http_version": b"HTTP/" + head.http_version, "reason_phrase": head.reason},
        )

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.reusable(now, self.keepalive_expiry):
                return connection
            connection.close()
        return None

    def _put_idle(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle:
            connection.close()
            return
        idle.append(connection)

    async def _connect(
        self, origin: Origin, request: httpx.Request, timeouts: _Timeouts
    ) -> _Connection:
        scheme, host, port = origin
        tls = self._tls() if scheme == "https" else None
        with _mapped(request, httpx.ConnectTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeouts.connect):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None
                )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections_opened += 1
        return _Connection(reader, writer)

    def _tls(self) -> ssl.SSLContext:
        if self.ssl_context is None:  # built once: loading the CA bundle is expensive
            self.ssl_context = httpx.create_ssl_context()
        return self.ssl_context

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class ClientTransport(httpx.AsyncBaseTransport):
    """httpx's own `AsyncClient` behind the transport interface: its proxy support from the
    environment, for hosts that reach the API only through a proxy."""

    def __init__(self) -> None:
        self.client = httpx.AsyncClient()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.client.send(request)

    async def aclose(self) -> None:
        await self.client.aclose()


def proxied(url: str) -> bool:
    """True when the environment (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY) sends `url` via a proxy."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False  # the sender reports the bad URL with each attempt
    proxies = urllib.request.getproxies()
    if parsed.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass(parsed.host)


def build_transport(url: str) -> httpx.AsyncBaseTransport:
    """The long-lived transport for `url`'s API: the lean one, or httpx's client behind a proxy."""
    if proxied(url):
        return ClientTransport()
    return KeepAliveTransport()
