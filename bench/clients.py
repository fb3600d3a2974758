"""The two load generators: a Python SMTP client on asyncio and Postfix's `smtp-source` (C).

Python client: `sessions` concurrent SMTP sessions, persistent (every mail of a session on one
connection) or one connection per mail, as fast as possible or at a steady rate. It records when
each mail's DATA ended, for end-of-DATA -> PagerDuty latency. Being Python, it competes with the
gateway for the same two cores: its numbers show what the whole box can do.

smtp-source: `-F FILE` sends the file's bytes as they are, the same bytes for every message of
a run (it reads the file once and adds no headers of its own), and the gateway rightly records
byte-identical copies as duplicates, never decided. So each mail gets its own file and its own
`smtp-source -m 1` run, `sessions` at a time: one mail per connection, and each run's start-up
(a few ms of CPU) is paid per mail. `client_cpu` reports that cost.
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import smtp_source_binary
from bench.workload import RECIPIENT, SENDER
from gateway.runtime.loop import run_event_loop


class SmtpError(Exception):
    """The server answered something other than what the dialogue expects."""


@dataclass(frozen=True)
class SendResult:
    """One load run: wall-clock span and per-mail end-of-DATA times (time.time())."""

    started: float
    finished: float
    sent_at: list[float]
    client_cpu: float  # CPU seconds of the load generator (and its children)

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def rate(self) -> float:
        return len(self.sent_at) / self.seconds


def smtp_data(raw: bytes) -> bytes:
    """The DATA payload: CRLF lines, leading dots doubled, the terminating dot line."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


class SmtpSession:
    """One SMTP connection. Like Postfix's client, it pipelines MAIL, RCPT and DATA (RFC 2920)
    when the server offers PIPELINING, and speaks the lock-step dialogue otherwise."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pipelining = False

    @classmethod
    async def open(cls, port: int) -> SmtpSession:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session._expect(220)
        writer.write(b"EHLO bench.example\r\n")
        session.pipelining = "PIPELINING" in await session._expect(250)
        return session

    async def send(self, data: bytes) -> float:
        """Send one mail (`data` from `smtp_data`); returns when its DATA ended."""
        envelope = (f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{RECIPIENT}>\r\n", "DATA\r\n")
        if self.pipelining:
            self.writer.write("".join(envelope).encode())
        for command, code in zip(envelope, (250, 250, 354), strict=True):
            if not self.pipelining:
                self.writer.write(command.encode())
            await self._expect(code)
        self.writer.write(data)
        ended = time.time()
        await self._expect(250)
        return ended

    async def close(self) -> None:
        self.writer.write(b"QUIT\r\n")
        try:
            await self._expect(221)
        finally:
            self.writer.close()

    async def _expect(self, code: int) -> list[str]:
        """The reply's lines (their text after the code), if its code is `code`."""
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError(f"connection closed, expected {code}")
            lines.append(line[4:].decode(errors="replace").strip())
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            raise SmtpError(f"expected {code}, got {line.decode(errors='replace').strip()}")
        return lines


def send_python(
    port: int,
    raws: Sequence[bytes],
    *,
    sessions: int = 16,
    persistent: bool = True,
    rate: float | None = None,
) -> SendResult:
    """Send every mail; with `rate`, mail n is due `n / rate` seconds after the start (a late
    session does not make the others wait, so the offered rate holds while sessions keep up)."""
    payloads = [smtp_data(raw) for raw in raws]
    sent_at = [0.0] * len(payloads)
    queue = iter(range(len(payloads)))
    cpu = _cpu()

    async def session_loop(started: float) -> None:
        session: SmtpSession | None = None
        for index in queue:
            if rate and (delay := started + index / rate - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            if session is None:
                session = await SmtpSession.open(port)
            sent_at[index] = await session.send(payloads[index])
            if not persistent:
                await session.close()
                session = None
        if session is not None:
            await session.close()

    async def run() -> tuple[float, float]:
        began, started = time.time(), time.monotonic()
        await asyncio.gather(*(session_loop(started) for _ in range(sessions)))
        return began, time.time()

    began, finished = run_event_loop(run())
    return SendResult(began, finished, sent_at, _cpu() - cpu)


def send_smtp_source(port: int, raws: Sequence[bytes], *, sessions: int = 16) -> SendResult:
    """Each mail through its own `smtp-source -F FILE -m 1` run, `sessions` runs at a time."""
    binary = smtp_source_binary()
    with tempfile.TemporaryDirectory(prefix="smtp-source-") as tmp:
        files = list(_message_files(Path(tmp), raws))
        sent_at = [0.0] * len(files)
        queue = iter(range(len(files)))
        cpu = _cpu()

        async def runner() -> None:
            for index in queue:
                proc = await asyncio.create_subprocess_exec(
                    binary, "-F", str(files[index]), "-m", "1", "-f", SENDER,
                    "-t", RECIPIENT, f"127.0.0.1:{port}",
                    stdout=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                if await proc.wait() != 0:
                    raise SmtpError(f"smtp-source exited with {proc.returncode}")
                sent_at[index] = time.time()

        async def run() -> tuple[float, float]:
            began = time.time()
            await asyncio.gather(*(runner() for _ in range(sessions)))
            return began, time.time()

        began, finished = run_event_loop(run())
        return SendResult(began, finished, sent_at, _cpu() - cpu)


def _message_files(directory: Path, raws: Sequence[bytes]) -> Iterator[Path]:
    """smtp-source reads lines and sends each with CRLF, dot-stuffed: write LF lines."""
    for n, raw in enumerate(raws):
        path = directory / f"{n}.eml"
        path.write_bytes(raw.replace(b"\r\n", b"\n"))
        yield path


def _cpu() -> float:
    """CPU seconds of this process and of its children that exited and were waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
