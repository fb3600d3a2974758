"""A minimal PagerDuty Events API endpoint for throughput runs: `python bench/pd_sink.py PORT`.

It answers every POST with 202 over keep-alive connections and does nothing else, so the
benchmark harness costs almost no CPU on the cores the gateway is measured on (the full-contract
stand-in, `tests/pdserver.py`, costs about 0.1 ms of Python per event). Latency runs still use
the full stand-in, which records when each event arrived.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

BODY = b'{"status":"success","message":"Event processed"}'
RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import serve_on_port  # noqa: E402


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    serve_on_port(serve)
