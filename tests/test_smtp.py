"""The SMTP listener: routing as a pure function, the protocol on an in-process listener with a
fake spool, and the whole gateway (`gateway serve` + PagerDuty stand-in) over real SMTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import re
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import aiosmtplib
import bcrypt
import pytest
import trustme

from gateway.config import ServiceSettings, SmtpSettings
from gateway.errors import ConfigError, StoreError
from gateway.intake import spool as intake
from gateway.intake.smtp_auth import (
    REPLY_TOO_MANY_AUTH_FAILURES,
    UsersFile,
    hash_password,
    load_users,
    verify_password,
)
from gateway.intake.smtp_handler import (
    REPLY_NO_SUCH_SERVICE,
    REPLY_SENDER_NOT_ALLOWED,
    REPLY_TEMPFAIL,
    received_header,
    route_recipient,
    sender_allowed,
)
from gateway.intake.smtp_listener import REPLY_TOO_MANY_CONNECTIONS, SmtpListener
from gateway.intake.smtp_session import REPLY_AUTH_REQUIRED, REPLY_SHUTTING_DOWN, REPLY_TOO_BIG
from gateway.store import Accepted, IncomingMail
from tests.conftest import ROOT, GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.pdserver import PagerDutyStandIn

# Reply codes, named as in aiosmtpd's testing/statuscodes.py.
S220_READY = 220
S221_BYE = 221
S235_AUTH_OK = 235
S250_OK = 250
S334_CHALLENGE = 334
S354_START_DATA = 354
S503_BAD_SEQUENCE = 503
S530_STARTTLS_FIRST = 530
S535_AUTH_INVALID = 535
S538_ENCRYPTION_REQUIRED = 538
S550_NO_SUCH_USER = 550

TIMEOUT = 10.0
LIMIT = 1024 * 1024  # max_message_bytes for the size tests
CRLF = b"\r\n"


# -- helpers -------------------------------------------------------------------------------------


class Reply(NamedTuple):
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class Wire:
    """A bare SMTP client: one command, one reply, and misbehaviour on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> tuple[Wire, Reply]:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname="localhost" if tls else None
        )
        wire = cls(reader, writer)
        return wire, await wire.reply()

    async def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not line:
                raise ConnectionError(f"connection closed after {lines!r}")
            lines.append(line.decode("utf-8").rstrip("\r\n"))
            if line[3:4] != b"-":
                return Reply(int(lines[-1][:3]), "\n".join(x[4:] for x in lines))

    async def cmd(self, line: str) -> Reply:
        self.writer.write(line.encode("utf-8") + CRLF)
        return await self.reply()

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="localhost")

    async def send_mail(
        self,
        message: bytes,
        rcpts: tuple[str, ...] = ("desk@gw.example",),
        sender: str = "support@helpdesk.example",
    ) -> Reply:
        """MAIL, RCPT..., DATA; returns the first non-2xx/3xx reply or the final one."""
        for line in [f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA"]:
            reply = await self.cmd(line)
            if reply.code >= 400:
                return reply
        await self.write(_dot_stuff(message) + b".\r\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


def _dot_stuff(message: bytes) -> bytes:
    body = message.replace(b"\r\n", b"\n").replace(b"\n", CRLF)
    body = re.sub(rb"(?m)^\.", b"..", body)
    return body if body.endswith(CRLF) else body + CRLF


class FakeSpool:
    """Stands in for SpoolWriter: records mails, or fails, or waits for a gate."""

    def __init__(self, fail: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.mails: list[IncomingMail] = []
        self.fail = fail
        self.gate = gate
        self.waiting = 0
        self.backlog = 0  # what pacing is told waits for a decision

    async def undecided(self) -> int:
        return self.backlog

    async def accept(self, mail: IncomingMail) -> Accepted:
        self.waiting += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.mails.append(mail)
        return Accepted(len(self.mails), None)


SERVICES = (
    ServiceSettings(name="helpdesk", addresses=("desk@*",), rules=()),
    ServiceSettings(
        name="ops",
        addresses=("ops@alerts.example", "*@alerts.example"),
        rules=(),
        allowed_senders=("*@helpdesk.example",),
    ),
    ServiceSettings(name="billing", addresses=("billing@corp.example",), rules=()),
    ServiceSettings(name="vip", addresses=("billing+vip@corp.example",), rules=()),
    ServiceSettings(name="catchall", addresses=("*@catchall.example",), rules=()),
    ServiceSettings(name="special", addresses=("special@catchall.example",), rules=()),
)


def settings(**overrides: object) -> SmtpSettings:
    values: dict[str, object] = {"listen": ("127.0.0.1:0",), "hostname": "gateway.test"}
    values.update(overrides)
    return SmtpSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def listening(
    smtp: SmtpSettings, spool: FakeSpool, services: tuple[ServiceSettings, ...] = SERVICES
) -> AsyncIterator[SmtpListener]:
    listener = SmtpListener(smtp, services, spool)  # type: ignore[arg-type]
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close(2.0)


async def eventually(predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll on the running loop until `predicate()` is truthy; fail at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


def port_of(listener: SmtpListener) -> int:
    return listener.bound[0][1]


# -- routing: pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("desk@gw.example", "helpdesk", id="wildcard-domain"),
        pytest.param("DESK@GW.Example", "helpdesk", id="case-insensitive"),
        pytest.param("desk+urgent@gw.example", "helpdesk", id="plus-addressing"),
        pytest.param("ops@alerts.example", "ops", id="exact"),
        pytest.param("pager@alerts.example", "ops", id="wildcard-local-part"),
        pytest.param("billing@corp.example", "billing", id="exact-other-service"),
        pytest.param("billing+vip@corp.example", "vip", id="listed-plus-address-wins"),
        pytest.param("billing+other@corp.example", "billing", id="unlisted-plus-address"),
        pytest.param("special@catchall.example", "special", id="exact-beats-pattern"),
        pytest.param("other@catchall.example", "catchall", id="pattern-after-exact"),
        pytest.param("nobody@corp.example", None, id="unknown"),
        pytest.param("desk", None, id="no-domain"),
        pytest.param("+tag@corp.example", None, id="empty-local-part"),
        pytest.param("desk@", "helpdesk", id="star-matches-empty"),
    ],
)
def test_route_recipient(address: str, expected: str | None) -> None:
    assert route_recipient(address, SERVICES) == expected


@pytest.mark.parametrize(
    ("sender", "patterns", "allowed"),
    [
        pytest.param("a@helpdesk.example", ("*@helpdesk.example",), True, id="match"),
        pytest.param("A@HelpDesk.Example", ("*@helpdesk.example",), True, id="case"),
        pytest.param("a@evil.example", ("*@helpdesk.example",), False, id="other-domain"),
        pytest.param("", ("*@helpdesk.example",), False, id="null-sender"),
        pytest.param("", (), True, id="no-policy"),
    ],
)
def test_sender_allowed(sender: str, patterns: tuple[str, ...], allowed: bool) -> None:
    assert sender_allowed(sender, patterns) is allowed


def test_received_header_is_a_trace_line() -> None:
    header = received_header(
        helo="mx.helpdesk.example\r\nX-Evil: 1",
        peer_ip="::1",
        by="gateway.test",
        protocol="ESMTPS",
        recipients=["desk@gw.example"],
    ).decode()
    assert header.startswith("Received: from mx.helpdesk.example??X-Evil:?1 ([IPv6:::1])\r\n")
    assert "\tby gateway.test with ESMTPS\r\n\tfor <desk@gw.example>; " in header
    assert header.endswith("\r\n") and header.count("\r\n") == 3
    two = received_header(
        helo=None, peer_ip="1.2.3.4", by="g", protocol="ESMTP", recipients=["a@x", "b@x"]
    ).decode()
    assert "for <" not in two and "from unknown ([1.2.3.4])" in two


# -- the users file ------------------------------------------------------------------------------


def test_password_hashes_verify() -> None:
    scrypt_hash = hash_password("s3cret")
    assert scrypt_hash.startswith("$scrypt$ln=14,r=8,p=1$")
    assert verify_password(b"s3cret", scrypt_hash)
    assert not verify_password(b"S3cret", scrypt_hash)
    htpasswd_b = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    assert verify_password(b"s3cret", htpasswd_b)
    assert not verify_password(b"wrong", htpasswd_b)
    assert not verify_password(b"x" * 100, htpasswd_b)  # bcrypt's 72-byte limit: False, no crash
    assert not verify_password(b"s3cret", "{PLAIN}s3cret")


def test_users_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# comment\n\nok:{hash_password('x')}\nbroken\nplain:{{PLAIN}}x\n")
    with pytest.raises(ConfigError) as caught:
        load_users(path)
    lines = [p.line for p in caught.value.problems]
    assert lines == [4, 5]
    assert "unknown hash format" in str(caught.value)


def test_users_file_reloads_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"helpdesk:{hash_password('one')}\n")
    users = UsersFile(path)
    assert users.verify("helpdesk", b"one")
    assert users.verify("helpdesk", b"one")  # the remembered digest path
    assert not users.verify("nobody", b"one")
    path.write_text(f"helpdesk:{hash_password('two')}\n# longer now\n")
    assert users.verify("helpdesk", b"two") and not users.verify("helpdesk", b"one")
    path.write_text("helpdesk\n")  # a broken edit
    assert users.verify("helpdesk", b"two")


def test_hash_password_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "hash-password", "helpdesk"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    user, _, hashed = line.partition(":")
    assert user == "helpdesk" and verify_password(b"correct horse", hashed)
    (tmp_path / "users").write_text(line + "\n")
    assert load_users(tmp_path / "users") == {"helpdesk": hashed}


# -- the protocol, in process --------------------------------------------------------------------


def test_recipients_routed_and_accepted_once() -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, greeting = await Wire.open(port_of(listener))
            assert greeting.code == S220_READY and "gateway.test" in greeting.text
            ehlo = await wire.cmd("EHLO mx.helpdesk.example")
            for extension in ("SIZE 10485760", "8BITMIME", "SMTPUTF8", "PIPELINING"):
                assert extension in ehlo.text
            assert "AUTH" not in ehlo.text and "STARTTLS" not in ehlo.text
            assert (await wire.cmd("MAIL FROM:<support@helpdesk.example>")).code == S250_OK
            assert (await wire.cmd("RCPT TO:<desk+urgent@gw.example>")).code == S250_OK
            unknown = await wire.cmd("RCPT TO:<nobody@corp.example>")
            assert str(unknown) == REPLY_NO_SUCH_SERVICE.format(address="nobody@corp.example")
            assert (await wire.cmd("RCPT TO:<ops@alerts.example>")).code == S250_OK
            assert (await wire.cmd("RCPT TO:<desk@other.example>")).code == S250_OK
            assert (await wire.cmd("DATA")).code == S354_START_DATA
            await wire.write(_dot_stuff(desk_mail("Printer on fire")) + b".\r\n")
            assert str(await wire.reply()) == "250 2.0.0 Ok: queued as 1"
            assert (await wire.cmd("QUIT")).code == S221_BYE
            await wire.close()
        [mail] = spool.mails
        assert mail.services == ("helpdesk", "ops")
        assert mail.rcpt_tos == (
            "desk+urgent@gw.example",
            "ops@alerts.example",
            "desk@other.example",
        )
        assert mail.mail_from == "support@helpdesk.example" and mail.source == "smtp"
        assert re.fullmatch(r"127\.0\.0\.1:\d+", mail.peer)
        assert mail.raw.startswith(b"Received: from mx.helpdesk.example ([127.0.0.1])\r\n")
        assert b"\tby gateway.test with ESMTP; " in mail.raw  # three recipients: no "for"

    run(scenario)


def test_a_pipelined_transaction_is_answered_in_order() -> None:
    """RFC 2920, as Postfix sends when PIPELINING is offered: MAIL, RCPTs and DATA in one
    write get their replies in order; a refused recipient refuses only itself, and a group
    whose recipients were all refused gets no 354, so its data is never taken as commands."""

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO mx.helpdesk.example")
            group = (
                "MAIL FROM:<support@helpdesk.example>",
                "RCPT TO:<desk@gw.example>",
                "RCPT TO:<nobody@corp.example>",
                "DATA",
            )
            await wire.write(CRLF.join(line.encode() for line in group) + CRLF)
            codes = [(await wire.reply()).code for _ in group]
            assert codes == [S250_OK, S250_OK, S550_NO_SUCH_USER, S354_START_DATA]
            await wire.write(_dot_stuff(desk_mail("Printer on fire")) + b".\r\n")
            assert (await wire.reply()).code == S250_OK
            refused = ("MAIL FROM:<support@helpdesk.example>", "RCPT TO:<x@corp.example>", "DATA")
            await wire.write(CRLF.join(line.encode() for line in refused) + b"\r\nNOOP\r\n")
            replies = [await wire.reply() for _ in range(len(refused) + 1)]
            assert [r.code for r in replies] == [
                S250_OK,
                S550_NO_SUCH_USER,
                S503_BAD_SEQUENCE,
                S250_OK,
            ]
            await wire.close()
        [mail] = spool.mails
        assert mail.rcpt_tos == ("desk@gw.example",)

    run(scenario)


def test_trace_header_does_not_change_the_fingerprint() -> None:
    """Without a Message-ID the fingerprint hashes the raw bytes: it must be taken before the
    Received line (which differs per delivery) is added, or redeliveries would not match."""
    message = b"From: a@helpdesk.example\r\nSubject: no id\r\n\r\nStatus: New\r\n"

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            for relay in ("mx1.example", "mx2.example"):
                wire, _ = await Wire.open(port_of(listener))
                await wire.cmd(f"EHLO {relay}")
                assert (await wire.send_mail(message)).code == S250_OK
                await wire.close()
        first, second = spool.mails
        assert first.raw != second.raw  # different Received lines (another relay)
        expected = intake.incoming(message, source="smtp", services=("helpdesk",)).fingerprint
        assert first.fingerprint == second.fingerprint == expected

    run(scenario)


def test_allowed_senders_and_null_sender() -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<mallory@evil.example>")
            refused = await wire.cmd("RCPT TO:<ops@alerts.example>")
            assert str(refused) == REPLY_SENDER_NOT_ALLOWED.format(address="ops@alerts.example")
            assert (await wire.cmd("RCPT TO:<desk@gw.example>")).code == S250_OK  # no policy
            assert (await wire.cmd("RSET")).code == S250_OK
            bounce = await wire.send_mail(b"Subject: bounce\r\n\r\nx\r\n", sender="")
            assert bounce.code == S250_OK
            await wire.close()
        assert spool.mails[0].mail_from == ""

    run(scenario)


def test_size_declared_at_mail_is_refused_early() -> None:
    async def scenario() -> None:
        async with listening(settings(max_message_bytes=LIMIT), FakeSpool()) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            big = await wire.cmd(f"MAIL FROM:<a@helpdesk.example> SIZE={LIMIT + 1}")
            assert str(big) == REPLY_TOO_BIG
            fits = await wire.cmd(f"MAIL FROM:<a@helpdesk.example> SIZE={LIMIT}")
            assert fits.code == S250_OK
            await wire.close()

    run(scenario)


def test_oversize_body_is_drained_not_buffered() -> None:
    """5x the limit on the wire: 552 at the end, server memory bounded by about one limit,
    and the session is still usable for the next message."""
    line = b"x" * 998 + CRLF
    chunk = line * 64

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(max_message_bytes=LIMIT), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            assert (await wire.cmd("DATA")).code == S354_START_DATA
            tracemalloc.start()
            try:
                for _ in range(5 * LIMIT // len(chunk) + 1):
                    await wire.write(chunk)
                await wire.write(b".\r\n")
                reply = await wire.reply()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert str(reply) == REPLY_TOO_BIG
            assert peak < 2 * LIMIT, f"peak {peak} bytes while receiving {5 * LIMIT}"
            assert (await wire.send_mail(desk_mail("small"))).code == S250_OK
            await wire.close()
        assert len(spool.mails) == 1

    run(scenario)


def test_long_lines_and_dots_arrive_intact() -> None:
    html = b"<p>" + b"a" * 300_000 + b"</p>"  # one 300 KB line, like real helpdesk HTML
    message = b"Subject: long\r\n\r\n" + html + b"\r\n.leading dot\r\n..two\r\nend\r\n"

    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            assert (await wire.send_mail(message)).code == S250_OK
            await wire.close()
        raw = spool.mails[0].raw
        assert raw[raw.index(b"Subject: long") :] == message

    run(scenario)


def test_connections_over_the_cap_get_421_before_the_greeting() -> None:
    async def scenario() -> None:
        async with listening(settings(max_connections=2), FakeSpool()) as listener:
            port = port_of(listener)
            first, _ = await Wire.open(port)
            second, _ = await Wire.open(port)
            third, refused = await Wire.open(port)
            assert str(refused) == REPLY_TOO_MANY_CONNECTIONS
            assert await third.reader.read() == b""  # and closed
            assert listener.active_sessions == 2
            await first.cmd("QUIT")
            await eventually(lambda: listener.active_sessions == 1)
            fourth, greeting = await Wire.open(port)
            assert greeting.code == S220_READY
            for wire in (first, second, third, fourth):
                await wire.close()

    run(scenario)


def test_store_failure_answers_451_without_details() -> None:
    async def scenario() -> None:
        spool = FakeSpool(fail=StoreError("database is locked at /var/lib/secret.sqlite3"))
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            reply = await wire.send_mail(desk_mail("x"))
            assert str(reply) == REPLY_TEMPFAIL
            assert (await wire.cmd("NOOP")).code == S250_OK  # the session goes on
            await wire.close()

    run(scenario)


def test_unexpected_exception_answers_451_not_500() -> None:
    """handle_exception: a bug in a hook (here a broken service record) is our fault: 4xx."""
    broken = (ServiceSettings(name="broken", addresses=None, rules=()),)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with listening(settings(), FakeSpool(), broken) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            reply = await wire.cmd("RCPT TO:<desk@gw.example>")
            assert str(reply) == REPLY_TEMPFAIL and "TypeError" not in reply.text
            assert (await wire.cmd("QUIT")).code == S221_BYE
            await wire.close()

    run(scenario)


def test_client_dropping_mid_data_leaves_nothing() -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            await wire.cmd("DATA")
            await wire.write(b"Subject: half\r\n\r\nStatus: New\r\n")
            wire.writer.transport.abort()
            await eventually(lambda: listener.active_sessions == 0)
        assert spool.mails == []

    run(scenario)


def test_disconnect_during_the_commit_does_not_cancel_it() -> None:
    """The spool writer owns a request once submitted; cancelling it would orphan the writer's
    reply (and kill SpoolWriter's thread). The sender retries and the copy is a duplicate."""

    async def scenario() -> None:
        gate = asyncio.Event()
        spool = FakeSpool(gate=gate)
        async with listening(settings(), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            await wire.cmd("DATA")
            await wire.write(_dot_stuff(desk_mail("committing")) + b".\r\n")
            await eventually(lambda: spool.waiting == 1)
            wire.writer.transport.abort()
            await eventually(lambda: listener.active_sessions == 0)
            gate.set()
            await eventually(lambda: len(spool.mails) == 1)

    run(scenario)


def test_close_lets_transactions_finish_and_turns_idle_sessions_away() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        spool = FakeSpool(gate=gate)
        listener = SmtpListener(settings(), SERVICES, spool)  # type: ignore[arg-type]
        await listener.start()
        port = port_of(listener)
        busy, _ = await Wire.open(port)
        idle, _ = await Wire.open(port)
        await idle.cmd("EHLO idle")
        await busy.cmd("EHLO busy")
        sending = asyncio.create_task(busy.send_mail(desk_mail("in flight")))
        await eventually(lambda: spool.waiting == 1)  # the busy session awaits its commit
        closing = asyncio.create_task(listener.close(grace=10))
        assert str(await idle.reply()) == REPLY_SHUTTING_DOWN
        with pytest.raises(OSError):
            await Wire.open(port)  # no longer listening
        gate.set()  # the commit completes: 250, then the session is closed too
        assert (await sending).code == S250_OK
        assert str(await busy.reply()) == REPLY_SHUTTING_DOWN
        await asyncio.wait_for(closing, TIMEOUT)
        assert listener.active_sessions == 0 and len(spool.mails) == 1
        await busy.close()
        await idle.close()

    run(scenario)


def test_bind_failure_names_the_address() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            listener = SmtpListener(
                settings(listen=("127.0.0.1:0", address)),
                SERVICES,
                FakeSpool(),  # type: ignore[arg-type]
            )
            with pytest.raises(OSError, match=re.escape(address)):
                await listener.start()

    run(scenario)


def _no_ipv6(reason: str) -> None:
    """A workstation without IPv6 skips; CI (which has ::1) must run the test."""
    if os.environ.get("CI"):
        pytest.fail(f"IPv6 loopback required in CI: {reason}")
    pytest.skip(reason)


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        _no_ipv6("no IPv6")

    async def scenario() -> None:
        try:
            listener = SmtpListener(settings(listen=("[::1]:0",)), SERVICES, FakeSpool())  # type: ignore[arg-type]
            await listener.start()
        except OSError as exc:
            _no_ipv6(f"IPv6 loopback unavailable: {exc}")
        try:
            host, port = listener.bound[0]
            assert host == "::1"
            wire, _ = await Wire.open(port, host="::1")
            await wire.cmd("EHLO client")
            assert (await wire.send_mail(desk_mail("v6"))).code == S250_OK
            await wire.close()
        finally:
            await listener.close(1.0)

    run(scenario)


# -- TLS and AUTH ----------------------------------------------------------------------------------


@dataclass
class Tls:
    cert: Path
    key: Path
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(cert, key, client)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users"
    htpasswd_b = bcrypt.hashpw(b"bcrypt-pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    path.write_text(f"# SMTP accounts\nhelpdesk:{hash_password('right')}\nzendesk:{htpasswd_b}\n")
    return path


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_starttls_required_before_mail(tls: Tls) -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(tls="starttls", tls_cert=tls.cert, tls_key=tls.key, require_tls=True)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            assert "STARTTLS" in (await wire.cmd("EHLO client")).text
            early = await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            assert early.code == S530_STARTTLS_FIRST
            assert (await wire.cmd("STARTTLS")).code == S220_READY
            await wire.starttls(tls.client)
            assert "STARTTLS" not in (await wire.cmd("EHLO client")).text
            assert (await wire.send_mail(desk_mail("over tls"))).code == S250_OK
            await wire.close()
        assert b" with ESMTPS\r\n" in spool.mails[0].raw

    run(scenario)


def test_commands_pipelined_behind_starttls_are_discarded(tls: Tls) -> None:
    """RFC 3207: plaintext sent after STARTTLS, before the handshake, is an attacker's way to
    inject commands into the encrypted session; offering PIPELINING must not let it in."""

    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(tls="starttls", tls_cert=tls.cert, tls_key=tls.key, require_tls=True)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.write(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
            assert (await wire.reply()).code == S220_READY
            await wire.starttls(tls.client)
            assert (await wire.cmd("EHLO client")).code == S250_OK
            assert (
                await wire.cmd("RCPT TO:<desk@gw.example>")
            ).code == S503_BAD_SEQUENCE  # no MAIL
            assert (await wire.send_mail(desk_mail("over tls"))).code == S250_OK
            await wire.close()
        assert [m.mail_from for m in spool.mails] == ["support@helpdesk.example"]

    run(scenario)


def test_implicit_tls(tls: Tls) -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(tls="implicit", tls_cert=tls.cert, tls_key=tls.key, require_tls=True)
        async with listening(smtp, spool) as listener:
            await aiosmtplib.send(
                desk_mail("implicit"),
                sender="a@helpdesk.example",
                recipients=["desk@gw.example"],
                hostname="127.0.0.1",
                port=port_of(listener),
                use_tls=True,
                tls_context=tls.client,
                timeout=TIMEOUT,
            )
            # Plaintext on a TLS port: the handshake fails and the connection is closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(listener))
            writer.write(b"EHLO plaintext\r\n")
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()
        assert b" with ESMTPS" in spool.mails[0].raw

    run(scenario)


def test_auth_required_plain_and_login(users_file: Path) -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(require_auth=True, auth_users_file=users_file)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            assert "AUTH LOGIN PLAIN" in (await wire.cmd("EHLO client")).text
            assert str(await wire.cmd("MAIL FROM:<a@helpdesk.example>")) == REPLY_AUTH_REQUIRED
            wrong = await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'wrong')}")
            assert wrong.code == S535_AUTH_INVALID and wrong.text.startswith("5.7.8")
            unknown = await wire.cmd(f"AUTH PLAIN {_plain('nobody', 'right')}")
            assert unknown.code == S535_AUTH_INVALID
            assert (
                await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")
            ).code == S235_AUTH_OK
            assert (await wire.send_mail(desk_mail("authenticated"))).code == S250_OK
            await wire.close()

            wire, _ = await Wire.open(port_of(listener))  # LOGIN, against the htpasswd -B hash
            await wire.cmd("EHLO client")
            assert (await wire.cmd("AUTH LOGIN")).code == S334_CHALLENGE
            assert (await wire.cmd(_b64("zendesk"))).code == S334_CHALLENGE
            assert (await wire.cmd(_b64("bcrypt-pw"))).code == S235_AUTH_OK
            await wire.close()
        assert b" with ESMTPA" in spool.mails[0].raw

    run(scenario)


def test_auth_gives_up_after_repeated_failures(users_file: Path) -> None:
    async def scenario() -> None:
        smtp = settings(require_auth=True, auth_users_file=users_file)
        async with listening(smtp, FakeSpool()) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            assert (await wire.cmd("AUTH PLAIN")).code == S334_CHALLENGE
            assert (await wire.cmd("*")).code == 501  # aborted: exactly one reply
            replies = [await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', str(i))}") for i in range(3)]
            assert [r.code for r in replies[:2]] == [S535_AUTH_INVALID] * 2
            assert str(replies[2]) == REPLY_TOO_MANY_AUTH_FAILURES
            assert await wire.reader.read() == b""
            await wire.close()

    run(scenario)


def test_auth_over_starttls_only_after_starttls(tls: Tls, users_file: Path) -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(
            tls="starttls",
            tls_cert=tls.cert,
            tls_key=tls.key,
            require_auth=True,
            auth_users_file=users_file,
        )
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            assert "AUTH" not in (await wire.cmd("EHLO client")).text
            early = await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")
            assert early.code == S538_ENCRYPTION_REQUIRED
            await wire.cmd("STARTTLS")
            await wire.starttls(tls.client)
            assert "AUTH LOGIN PLAIN" in (await wire.cmd("EHLO client")).text
            assert (
                await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")
            ).code == S235_AUTH_OK
            assert (await wire.send_mail(desk_mail("tls+auth"))).code == S250_OK
            await wire.close()
        assert b" with ESMTPSA" in spool.mails[0].raw

    run(scenario)


# -- end to end: `gateway serve` + PagerDuty stand-in ---------------------------------------------


@dataclass
class Served:
    pd: PagerDutyStandIn
    gateway: GatewayProcess
    config: Path

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def db(self) -> Path:
        return self.config.parent / "data" / "gateway.sqlite3"

    def send(self, message: bytes, to: str = "desk@gw.example") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
            client.sendmail("support@helpdesk.example", [to], message)

    def wait(self, predicate: Callable[[], object], timeout: float = 15.0) -> object:
        """wait_until, with the gateway's log tail in the failure message."""
        try:
            return wait_until(predicate, timeout)
        except AssertionError:
            tail = self.gateway.output()[-6000:]
            raise AssertionError(f"not met in {timeout}s; log:\n{tail}") from None

    def events(self, key: str) -> list[dict]:
        return [e for e in list(self.pd.events) if e.get("dedup_key") == key]

    def messages(self) -> int:
        with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]

    def incident(self, key: str) -> list[str] | None:
        """The `gateway incidents` row for `key`, split into columns."""
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "incidents"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            check=True,
        )
        for line in result.stdout.splitlines():
            columns = re.split(r"\s{2,}", line.strip())
            if len(columns) > 3 and columns[1] == key:
                return columns
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("served")
    pd = PagerDutyStandIn().start()
    port = free_port()
    config = write_config(
        directory,
        pd_url=pd.url,
        smtp_port=port,
        # every test client comes from 127.0.0.1: let it use every slot
        smtp_extra=f"max_connections = 50\nmax_unauthenticated_per_ip = 50\n"
        f"max_message_bytes = {LIMIT}",
    )
    gateway = GatewayProcess(config, port).start()
    yield Served(pd, gateway, config)
    try:
        assert gateway.stop() == 0
        log = gateway.output()
        smtp_errors = [line for line in log.splitlines() if " ERROR " in line and ".smtp" in line]
        assert "Traceback" not in log and not smtp_errors, log[-3000:]
    finally:
        pd.stop()


def _token() -> str:
    return uuid.uuid4().hex[:8]


def test_new_duplicate_resolve_end_to_end(served: Served) -> None:
    subject = f"Printer on fire {_token()}"
    served.send(desk_mail(subject, "New"))
    [trigger] = wait_until(lambda: served.events(subject))
    assert trigger["event_action"] == "trigger" and trigger["payload"]["summary"] == subject

    served.send(desk_mail(subject, "New"))  # the helpdesk sends "new" again (new Message-ID)
    row = wait_until(lambda: (r := served.incident(subject)) and r[3] == "2" and r)
    assert row[2] == "triggered"  # counted; coalesced into the trigger sent (issue 12)

    served.send(desk_mail(f"Re: {subject}", "Resolved"))
    events = wait_until(lambda: (e := served.events(subject)) and len(e) == 2 and e)
    assert [e["event_action"] for e in events] == ["trigger", "resolve"]
    wait_until(lambda: served.incident(subject)[2] == "resolved")


def test_unknown_recipient_and_oversize_end_to_end(served: Served) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        served.send(desk_mail("x"), to="nobody@gw.example")
    code, text = refused.value.recipients["nobody@gw.example"]
    assert code == S550_NO_SUCH_USER and text.startswith(b"5.1.1 <nobody@gw.example>")

    big = desk_mail("big", extra="x" * (LIMIT + 10))
    with pytest.raises(smtplib.SMTPSenderRefused) as declared:  # smtplib sends SIZE= itself
        served.send(big)
    assert f"{declared.value.smtp_code} {declared.value.smtp_error.decode()}" == REPLY_TOO_BIG

    async def undeclared() -> None:
        wire, _ = await Wire.open(served.port)
        await wire.cmd("EHLO client")
        reply = await wire.send_mail(big * 3)  # no SIZE=, 3x the limit on the wire
        assert str(reply) == REPLY_TOO_BIG
        assert (await wire.send_mail(desk_mail(f"after big {_token()}"))).code == S250_OK
        await wire.close()

    run(undeclared)


def test_client_dropping_mid_data_end_to_end(served: Served) -> None:
    before = served.messages()

    async def drop() -> None:
        wire, _ = await Wire.open(served.port)
        await wire.cmd("EHLO client")
        await wire.cmd("MAIL FROM:<a@helpdesk.example>")
        await wire.cmd("RCPT TO:<desk@gw.example>")
        await wire.cmd("DATA")
        await wire.write(desk_mail("half a message")[:150])
        wire.writer.transport.abort()

    run(drop)
    subject = f"complete {_token()}"
    served.send(desk_mail(subject))  # a later, complete message is stored...
    wait_until(lambda: served.events(subject))
    assert served.messages() == before + 1  # ...and the dropped one never is


def test_200_clients_against_50_connections(served: Served) -> None:
    """Every client gets its mail in; the ones refused with 421 retry, as an MTA would.

    50 idle connections are held open first, so the cap is certainly hit; they are released
    once refusals were seen."""
    token = _token()
    refusals = 0
    before = served.messages()

    async def client(i: int) -> None:
        nonlocal refusals
        message = desk_mail(f"load {token} {i}")
        for _ in range(500):
            try:
                await aiosmtplib.send(
                    message,
                    sender="support@helpdesk.example",
                    recipients=["desk@gw.example"],
                    hostname="127.0.0.1",
                    port=served.port,
                    timeout=TIMEOUT,
                )
                return
            except aiosmtplib.SMTPConnectResponseError as exc:
                assert exc.code == 421, exc
                refusals += 1
                await asyncio.sleep(random.uniform(0.01, 0.05))  # an MTA's retry backoff
        raise AssertionError(f"client {i} never got through")

    async def scenario() -> None:
        holders = [await Wire.open(served.port) for _ in range(50)]
        assert all(greeting.code == S220_READY for _, greeting in holders)
        clients = asyncio.gather(*(client(i) for i in range(200)))
        await eventually(lambda: refusals >= 20)
        for wire, _ in holders:
            await wire.close()
        await asyncio.wait_for(clients, 45)

    run(scenario)
    keys = {f"load {token} {i}" for i in range(200)}
    wait_until(lambda: keys <= {e["dedup_key"] for e in list(served.pd.events)}, timeout=30)
    assert served.messages() == before + 200


def test_pagerduty_down_then_up_delivers_once_in_order(served: Served) -> None:
    token = _token()
    subjects = [f"outage {token} {i}" for i in range(5)]
    served.pd.fail_next(5)
    for subject in subjects:
        served.send(desk_mail(subject, "New"))
    for subject in subjects:
        served.send(desk_mail(subject, "Resolved"))
    served.wait(lambda: all(len(served.events(s)) == 2 for s in subjects), timeout=30)
    for subject in subjects:
        assert [e["event_action"] for e in served.events(subject)] == ["trigger", "resolve"]
    failed = [r for r in served.pd.requests if (r["event"] or {}).get("dedup_key") in subjects]
    assert len(failed) == 10 + 5  # every event once, plus the five answered with 500


def test_sigterm_exits_0_and_restart_resumes_the_outbox(
    gateway_process: GatewayProcess, pd: PagerDutyStandIn
) -> None:
    pd.fail_next(10_000)
    gateway_process.start()
    subject = f"pending over restart {_token()}"
    with smtplib.SMTP("127.0.0.1", gateway_process.port, timeout=TIMEOUT) as client:
        client.sendmail("support@helpdesk.example", ["desk@gw.example"], desk_mail(subject))
    wait_until(lambda: pd.requests)  # tried, and failed

    async def idle_session_is_told_421() -> None:
        wire, _ = await Wire.open(gateway_process.port)
        await wire.cmd("EHLO idle")
        assert gateway_process.proc is not None
        gateway_process.proc.terminate()
        assert str(await wire.reply()) == REPLY_SHUTTING_DOWN
        await wire.close()

    run(idle_session_is_told_421)
    assert gateway_process.stop() == 0
    with pd.lock:
        pd.script.clear()
    gateway_process.start()
    [event] = pd.wait_for(1, timeout=20)
    assert event["dedup_key"] == subject and event["event_action"] == "trigger"
    assert gateway_process.stop() == 0


def test_cached_introspection_answers_like_aiosmtpd_expects() -> None:
    """The per-class cache must give SMTP.__init__ the same hooks, commands and AUTH methods."""
    import inspect as real

    from gateway.intake.smtp_compat import _ClassCachedInspection

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"

        async def auth_CUSTOM(self, server, args):
            return None

    cached, handler = _ClassCachedInspection(), Handler()
    for _ in range(2):  # the second answer comes from the cache
        names = cached.dir(handler)
        assert {n for n in names if n.startswith("handle_")} == {"handle_DATA"}
        assert [n for n, _ in cached.getmembers(handler)] == ["auth_CUSTOM"]
        expected = [(n, m) for n, m in real.getmembers(handler) if n.startswith("auth_")]
        assert cached.getmembers(handler) == expected
        assert cached.signature(handler.handle_DATA) == real.signature(handler.handle_DATA)
    handler.handle_EXTRA = lambda: None  # instance attributes still count
    assert "handle_EXTRA" in cached.dir(handler)
