"""`WebServer` in this process, on loopback: uvicorn on the running loop, and the answers uvicorn
would not give by itself (gateway/web/uvicorn_compat.py). These fail when uvicorn changes what
the compat module relies on."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest
from starlette.types import Receive, Scope, Send

from gateway.web import uvicorn_compat
from gateway.web.hardening import Limits, SecureResponses
from gateway.web.server import WebServer
from tests.conftest import free_port

CSP = b"Content-Security-Policy: default-src 'none'"
BIG = 16 * 1024 * 1024


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    body = b"x" * BIG if scope["path"] == "/big" else b"hello\n"
    length = str(len(body)).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
    )
    await send({"type": "http.response.body", "body": body})


APP = SecureResponses(hello)


def serving(test: Callable[[WebServer], Awaitable[None]], limits: Limits | None = None) -> None:
    """Run `test` against a started WebServer on a free loopback port, then close it."""

    async def go() -> None:
        server = WebServer(f"127.0.0.1:{free_port()}", APP, limits)
        await server.start()
        try:
            await test(server)
        finally:
            await server.close()

    asyncio.run(go())


def threads() -> set[str]:
    """This process's threads, less asyncio's executor (getaddrinfo runs there)."""
    return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}


def handlers() -> dict[int, object]:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


async def exchange(
    server: WebServer, *parts: bytes, pause: float = 0.0, rcvbuf: int | None = None
) -> bytes:
    """Send `parts` (pausing between them), then read the answer until the server closes."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, tuple(server.bound[0]))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(_read_all(reader), 10)
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def status_of(answer: bytes) -> bytes:
    return answer.split(b" ", 2)[1]


def test_serves_on_the_running_loop_without_threads() -> None:
    async def check(server: WebServer) -> None:
        assert threads() == before
        assert any(t.get_name() == "web" for t in asyncio.all_tasks())
        answer = await exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == b"200" and answer.endswith(b"hello\n")
        assert b"server:" not in answer.lower()  # no Server header
        assert b"Connection: close" in answer

    before = threads()
    serving(check)


def test_port_taken_is_an_oserror_for_the_caller() -> None:
    async def go() -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            server = WebServer(f"127.0.0.1:{taken.getsockname()[1]}", APP)
            with pytest.raises(OSError):
                await server.start()
            await server.close()  # harmless when it never started

    asyncio.run(go())


def test_leaves_the_signal_handlers_alone() -> None:
    """The gateway's service owns SIGTERM/SIGINT; uvicorn's own capture would replace them."""

    async def go() -> None:
        before = handlers()  # asyncio.run's SIGINT handler among them
        server = WebServer(f"127.0.0.1:{free_port()}", APP)
        await server.start()
        assert handlers() == before
        await server.close()
        assert handlers() == before

    asyncio.run(go())


def test_close_stops_listening() -> None:
    async def go() -> None:
        server = WebServer(f"127.0.0.1:{free_port()}", APP)
        await server.start()
        address = tuple(server.bound[0])
        await server.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(*address)

    asyncio.run(go())


PROTOCOL_ANSWERS = [
    pytest.param([b"NONSENSE\r\n\r\n"], b"400", id="garbage"),
    pytest.param(  # h11 refuses a head still incomplete past the limit, without waiting
        [b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000],
        b"431",
        id="head-too-large-incomplete",
    ),
    pytest.param(
        [b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"],
        b"501",
        id="unsupported-transfer-encoding",
    ),
    pytest.param([b"GET / HTTP/1.1\r\nHost: x\r\n"], b"408", id="head-never-ends"),
]


@pytest.mark.parametrize(("parts", "status"), PROTOCOL_ANSWERS)
def test_protocol_answers_carry_the_status_and_headers(parts: list[bytes], status: bytes) -> None:
    async def check(server: WebServer) -> None:
        answer = await exchange(server, *parts, pause=0.1)
        assert status_of(answer) == status, answer[:200]
        assert CSP in answer and b"Connection: close" in answer

    serving(check, Limits(request_timeout=0.5))


def test_connections_over_the_limit_get_503() -> None:
    async def check(server: WebServer) -> None:
        idle = [await asyncio.open_connection(*server.bound[0]) for _ in range(2)]
        await asyncio.sleep(0.05)
        answer = await exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == b"503" and CSP in answer
        for _, writer in idle:
            writer.close()
        for _ in range(100):  # the server notices the closed connections
            answer = await exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if status_of(answer) == b"200":
                break
            await asyncio.sleep(0.02)
        assert status_of(answer) == b"200"

    serving(check, Limits(max_connections=2))


def test_a_client_that_stops_reading_is_disconnected() -> None:
    async def check(server: WebServer) -> None:
        answer = await exchange(
            server, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n", pause=1.0, rcvbuf=4096
        )
        assert status_of(answer) == b"200"
        assert len(answer) < BIG  # cut off, and the connection closed

    serving(check, Limits(write_timeout=0.3))


def test_compat_names_what_uvicorn_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    uvicorn_compat.check_upstream()  # the installed uvicorn has every member
    missing = (*uvicorn_compat.RELIED_ON, (uvicorn_compat.H11Protocol, "gone_member"))
    monkeypatch.setattr(uvicorn_compat, "RELIED_ON", missing)
    with pytest.raises(ImportError, match=r"H11Protocol\.gone_member"):
        uvicorn_compat.check_upstream()
