"""The PagerDuty sender's HTTP transport (`delivery/http11.py`), over real HTTP on loopback.

The contract stand-in (`tests/pdserver.py`) covers the Events API answers; a raw asyncio server
plays the misbehaving peers (silence, hang-ups, chunked and close-delimited bodies, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trustme

from gateway.delivery.http11 import (
    MAX_RESPONSE_BYTES,
    ClientTransport,
    KeepAliveTransport,
    build_transport,
)
from gateway.delivery.pagerduty import PagerDutySender
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem
from tests.conftest import ROUTING_KEY
from tests.pdserver import PagerDutyStandIn

ACCEPTED = b'{"status":"success","message":"Event processed"}'
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _item(key: str = "k", service: str = "s") -> OutboxItem:
    event = {"event_action": "resolve", "dedup_key": key}
    now = time.time()
    return OutboxItem(1, "pagerduty", service, key, event, "pending", 0, now, now, "", "")


def _sender(transport: httpx.AsyncBaseTransport, url: str, timeout: float = 5.0) -> PagerDutySender:
    return PagerDutySender(transport, url, {"s": ROUTING_KEY}, timeout=timeout)


def _answer(status: bytes = b"202 Accepted", body: bytes = ACCEPTED, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (headers and Content-Length body); b"" when the client hung up."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


class RawServer:
    """A loopback server running `handler` per connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        request = await _read_request(reader)
        self.requests += bool(request)
        return request


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[RawServer, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[RawServer, str]]:
    raw = RawServer(lambda r, w: handler(raw, r, w))
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    async with server:
        yield raw, f"{scheme}://127.0.0.1:{port}/v2/enqueue"


async def keep_answering(
    raw: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
):
    while await raw.read(reader):
        writer.write(_answer())
        await writer.drain()


# -- keep-alive ------------------------------------------------------------------------------


def test_sequential_events_share_one_keepalive_connection(pd: PagerDutyStandIn) -> None:
    async def send() -> int:
        async with KeepAliveTransport() as transport:
            sender = _sender(transport, pd.url)
            for number in range(5):
                await sender(_item(f"k{number}"))
            return transport.connections_opened

    assert asyncio.run(send()) == 1
    assert len(pd.events) == 5
    assert len({request["peer"] for request in pd.requests}) == 1


def test_concurrent_events_get_a_connection_each_and_reuse_them(pd: PagerDutyStandIn) -> None:
    async def send() -> int:
        async with KeepAliveTransport() as transport:
            sender = _sender(transport, pd.url)
            for round_ in range(2):
                await asyncio.gather(*(sender(_item(f"{round_}-{n}")) for n in range(4)))
            return transport.connections_opened

    assert asyncio.run(send()) == 4
    assert len(pd.events) == 8
    assert len({request["peer"] for request in pd.requests}) == 4


def test_sending_events_does_no_import_lookups(pd: PagerDutyStandIn) -> None:
    """httpx's default transport searched sys.path for `sniffio` on every request (it asks
    which async library runs, and anyio no longer installs sniffio): pure waste per event."""

    class Recorder:
        lookups: list[str] = []  # noqa: RUF012

        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            self.lookups.append(name)

    async def send(count: int) -> None:
        async with build_transport(pd.url) as transport:
            sender = _sender(transport, pd.url)
            for number in range(count):
                await sender(_item(f"k{number}"))

    asyncio.run(send(2))  # first use may import what it needs, once
    recorder = Recorder()
    sys.meta_path.insert(0, recorder)  # type: ignore[arg-type]
    try:
        asyncio.run(send(5))
    finally:
        sys.meta_path.remove(recorder)  # type: ignore[arg-type]
    assert recorder.lookups == []
    assert len(pd.events) == 7


def test_a_server_closing_idle_connections_costs_no_failure() -> None:
    async def one_answer_then_close(raw, reader, writer) -> None:
        if await raw.read(reader):
            writer.write(_answer())  # keep-alive by default, yet the server closes right after
            await writer.drain()

    async def send() -> RawServer:
        async with (
            raw_server(one_answer_then_close) as (raw, url),
            KeepAliveTransport() as transport,
        ):
            sender = _sender(transport, url)
            for number in range(3):
                await sender(_item(f"k{number}"))
            return raw

    raw = asyncio.run(send())
    assert raw.connections == 3
    assert raw.requests == 3  # each event sent once: a stale connection answered nothing


def test_connection_close_is_respected() -> None:
    async def close_after_answer(raw, reader, writer) -> None:
        while await raw.read(reader):
            writer.write(_answer(extra=b"Connection: close\r\n"))
            await writer.drain()

    async def send() -> tuple[RawServer, int]:
        async with (
            raw_server(close_after_answer) as (raw, url),
            KeepAliveTransport() as transport,
        ):
            sender = _sender(transport, url)
            await sender(_item("a"))
            await sender(_item("b"))
            return raw, transport.connections_opened

    raw, opened = asyncio.run(send())
    assert (raw.connections, raw.requests, opened) == (2, 2, 2)


def test_an_idle_connection_expires() -> None:
    async def send() -> int:
        async with (
            raw_server(keep_answering) as (_, url),
            KeepAliveTransport(keepalive_expiry=0.0) as transport,
        ):
            sender = _sender(transport, url)
            await sender(_item("a"))
            await sender(_item("b"))
            return transport.connections_opened

    assert asyncio.run(send()) == 2


# -- the Events API's answers ----------------------------------------------------------------


def test_429_retry_after_is_temporary_and_keeps_the_connection(pd: PagerDutyStandIn) -> None:
    pd.fail_next(1, 429, Retry_After="7")

    async def send() -> tuple[TemporaryDeliveryError, int]:
        async with KeepAliveTransport() as transport:
            sender = _sender(transport, pd.url)
            with pytest.raises(TemporaryDeliveryError) as info:
                await sender(_item())
            await sender(_item())
            return info.value, transport.connections_opened

    error, opened = asyncio.run(send())
    assert error.retry_after == 7.0
    assert "HTTP 429" in str(error)
    assert opened == 1
    assert len(pd.events) == 1


def test_500_is_temporary(pd: PagerDutyStandIn) -> None:
    pd.fail_next(1, 500)

    async def send() -> None:
        async with KeepAliveTransport() as transport:
            await _sender(transport, pd.url)(_item())

    with pytest.raises(TemporaryDeliveryError, match="HTTP 500"):
        asyncio.run(send())


def test_400_is_rejected_with_the_response(pd: PagerDutyStandIn) -> None:
    async def send() -> None:
        async with KeepAliveTransport() as transport:
            sender = PagerDutySender(transport, pd.url, {"s": "too-short"})
            await sender(_item())

    with pytest.raises(RejectedDeliveryError) as info:
        asyncio.run(send())
    assert "routing_key" in (info.value.response or "")


# -- network trouble -------------------------------------------------------------------------


def test_a_silent_server_is_a_read_timeout() -> None:
    async def never_answer(raw, reader, writer) -> None:
        await raw.read(reader)
        await reader.read()  # until the client gives up and hangs up

    async def send() -> None:
        async with raw_server(never_answer) as (_, url), KeepAliveTransport() as transport:
            await _sender(transport, url, timeout=0.2)(_item())

    with pytest.raises(TemporaryDeliveryError, match="timeout: ReadTimeout"):
        asyncio.run(send())


def test_connection_refused_is_a_connection_error() -> None:
    with socket.socket() as bound:  # bound, never listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}/v2/enqueue"

        async def send() -> None:
            async with KeepAliveTransport() as transport:
                await _sender(transport, url)(_item())

        with pytest.raises(TemporaryDeliveryError, match="connection error"):
            asyncio.run(send())


def test_a_hang_up_mid_answer_is_a_connection_error_and_not_resent() -> None:
    async def answer_then_cut_the_second(raw, reader, writer) -> None:
        await raw.read(reader)
        writer.write(_answer())
        await raw.read(reader)
        writer.write(_answer()[:20])  # half a status line, then gone
        await writer.drain()

    async def send() -> RawServer:
        async with (
            raw_server(answer_then_cut_the_second) as (raw, url),
            KeepAliveTransport() as transport,
        ):
            sender = _sender(transport, url)
            await sender(_item("a"))
            with pytest.raises(TemporaryDeliveryError, match="connection error"):
                await sender(_item("b"))  # on the reused connection, partly answered
            return raw

    raw = asyncio.run(send())
    assert raw.requests == 2  # the half-answered request was not sent again


def test_an_oversized_answer_is_refused() -> None:
    async def huge(raw, reader, writer) -> None:
        await raw.read(reader)
        writer.write(_answer(body=b"x" * (MAX_RESPONSE_BYTES + 1)))
        await writer.drain()

    async def send() -> None:
        async with raw_server(huge) as (_, url), KeepAliveTransport() as transport:
            await _sender(transport, url)(_item())

    with pytest.raises(TemporaryDeliveryError, match="connection error: response body over"):
        asyncio.run(send())


def test_a_cancelled_request_leaves_no_connection_behind() -> None:
    answer_second = asyncio.Event()

    async def slow_first(raw, reader, writer) -> None:
        first = raw.connections == 1
        while await raw.read(reader):
            if first:
                await answer_second.wait()  # never, for the cancelled request
            writer.write(_answer())
            await writer.drain()

    async def send() -> int:
        async with raw_server(slow_first) as (raw, url), KeepAliveTransport() as transport:
            sender = _sender(transport, url)
            attempt = asyncio.create_task(sender(_item("a")))
            deadline = time.monotonic() + 10
            while raw.requests < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            await sender(_item("b"))
            return transport.connections_opened

    assert asyncio.run(send()) == 2


# -- response framing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"a\r\n" + ACCEPTED[:10] + b"\r\n" + hex(len(ACCEPTED) - 10)[2:].encode() + b"\r\n"
            b"" + ACCEPTED[10:] + b"\r\n0\r\n\r\n",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.0 202 Accepted\r\n\r\n" + ACCEPTED, id="close-delimited"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(), id="informational-then-final"),
    ],
)
def test_answers_are_read_whole(answer: bytes) -> None:
    async def reply(raw, reader, writer) -> None:
        await raw.read(reader)
        writer.write(answer)
        await writer.drain()

    async def send() -> str:
        async with raw_server(reply) as (_, url), KeepAliveTransport() as transport:
            return await _sender(transport, url)(_item())

    assert asyncio.run(send()) == ACCEPTED.decode()


# -- TLS and proxies -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_pair(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    server_tls, client_tls = _tls_pair(ca)

    async def send() -> int:
        async with (
            raw_server(keep_answering, tls=server_tls) as (_, url),
            KeepAliveTransport(ssl_context=client_tls) as transport,
        ):
            sender = _sender(transport, url)
            await sender(_item("a"))
            await sender(_item("b"))
            return transport.connections_opened

    assert asyncio.run(send()) == 1


def test_https_with_an_untrusted_certificate_is_a_connection_error(ca: trustme.CA) -> None:
    server_tls, _ = _tls_pair(ca)
    stranger = ssl.create_default_context()  # the system's CAs only

    async def send() -> None:
        async with (
            raw_server(keep_answering, tls=server_tls) as (_, url),
            KeepAliveTransport(ssl_context=stranger) as transport,
        ):
            await _sender(transport, url)(_item())

    with pytest.raises(TemporaryDeliveryError, match=r"connection error.*CERTIFICATE_VERIFY"):
        asyncio.run(send())


def test_httpx_own_client_behind_the_transport_interface(pd: PagerDutyStandIn) -> None:
    """What a host behind a proxy uses: same sender, same answers."""
    pd.fail_next(1, 429, Retry_After="3")

    async def send() -> TemporaryDeliveryError:
        async with ClientTransport() as transport:
            sender = _sender(transport, pd.url)
            with pytest.raises(TemporaryDeliveryError) as info:
                await sender(_item("a"))
            await sender(_item("a"))
            return info.value

    assert asyncio.run(send()).retry_after == 3.0
    assert [event["dedup_key"] for event in pd.events] == ["a"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, KeepAliveTransport, id="no-proxy"),
        pytest.param({"HTTPS_PROXY": "http://proxy:3128"}, ClientTransport, id="https-proxy"),
        pytest.param({"ALL_PROXY": "http://proxy:3128"}, ClientTransport, id="all-proxy"),
        pytest.param({"HTTP_PROXY": "http://proxy:3128"}, KeepAliveTransport, id="other-scheme"),
        pytest.param(
            {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "events.pagerduty.com"},
            KeepAliveTransport,
            id="bypassed",
        ),
    ],
)
def test_a_proxy_in_the_environment_gets_httpx_own_client(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: type
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    transport = build_transport("https://events.pagerduty.com/v2/enqueue")
    assert type(transport) is expected
    asyncio.run(transport.aclose())
