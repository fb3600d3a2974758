"""A minimal PagerDuty Events API endpoint for benchmarks, in its own process.

    python bench/pd_sink.py PORT [--rate EVENTS_PER_SECOND]

It answers every POST with 202 over keep-alive connections, each response in one write (two
writes stall a keep-alive client about 40 ms: Nagle + delayed ACK). With `--rate` it plays
PagerDuty's throttling: at most that many events accepted in any one-second window, and `429`
for anything beyond. It records, per request, the time it arrived, the answer,
the event's action and its dedup_key; `GET /log` returns them as JSON lines, so a benchmark
learns when each event reached "PagerDuty" without costing the measured cores much (the
full-contract stand-in, `tests/pdserver.py`, costs about 0.1 ms of Python per event).

`PdSink` starts one as a child process and reads its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.common import wait_for_port  # noqa: E402
from gateway.runtime.loop import run_event_loop  # noqa: E402
from tests.net import free_port  # noqa: E402


def _response(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


ACCEPTED = _response("202 Accepted", b'{"status":"success","message":"Event processed"}')
THROTTLED = _response(
    "429 Too Many Requests",
    b'{"status":"throttle event","message":"Requests for this service are arriving too quickly."}',
)


class Throttle:
    """At most `rate` accepted events in any one-second window; no rate: everything passes.

    Strict on purpose: a client pacing at exactly the limit still meets an occasional 429 when
    network jitter bunches two of its requests, as it would against PagerDuty's quota."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.accepted: deque[float] = deque()

    def take(self) -> bool:
        if not self.rate:
            return True
        now = time.monotonic()
        while self.accepted and now - self.accepted[0] >= 1.0:
            self.accepted.popleft()
        if len(self.accepted) >= self.rate:
            return False
        self.accepted.append(now)
        return True


class Sink(asyncio.Protocol):
    """One connection: requests parsed by Content-Length, each answered in one write."""

    def __init__(self, throttle: Throttle, log: list[bytes]) -> None:
        self.throttle = throttle
        self.log = log
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 :].split(b"\r\n", 1)[0]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            if head.startswith(b"get /log"):
                text = b"".join(self.log)
                self.transport.write(_response("200 OK", text))  # type: ignore[attr-defined]
            else:
                self.transport.write(self._answer(body))  # type: ignore[attr-defined]

    def _answer(self, body: bytes) -> bytes:
        at = time.time()
        accepted = self.throttle.take()
        try:
            event = json.loads(body)
            action, key = event.get("event_action", ""), event.get("dedup_key", "")
        except (ValueError, AttributeError):
            action, key = "", ""
        status = 202 if accepted else 429
        self.log.append(json.dumps([at, status, action, key]).encode() + b"\n")
        return ACCEPTED if accepted else THROTTLED


async def serve(port: int, rate: float | None) -> None:
    throttle, log = Throttle(rate), []
    server = await asyncio.get_running_loop().create_server(
        lambda: Sink(throttle, log), "127.0.0.1", port, backlog=1024
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


@dataclass(frozen=True)
class Request:
    """One POST as the sink saw it."""

    at: float  # time.time() when it arrived
    status: int  # 202 or 429
    action: str
    key: str


class PdSink:
    """The sink as a child process: `url` for the gateway's config, `requests()` its log."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate

    def __enter__(self) -> PdSink:
        self.port = free_port()
        args = [sys.executable, str(HERE / "pd_sink.py"), str(self.port)]
        if self.rate:
            args += ["--rate", str(self.rate)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, greeting=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/enqueue"

    def requests(self) -> list[Request]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/log", timeout=30) as answer:
            lines = answer.read().splitlines()
        return [Request(*json.loads(line)) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--rate", type=float, help="accept this many events/s, 429 beyond")
    args = parser.parse_args()
    run_event_loop(serve(args.port, args.rate))


if __name__ == "__main__":
    main()
