"""SMTP access control on a real listener on loopback: what the server reveals, who may send,
how password guessing is slowed and stopped, and how long one client may hold a slot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from pathlib import Path

import aiosmtpd
import pytest

from gateway.intake.smtp_auth import REPLY_AUTH_LOCKED_OUT, hash_password
from gateway.intake.smtp_limits import AuthThrottle, Refusals, client_key
from gateway.intake.smtp_listener import (
    REPLY_AUTH_LOCKED_OUT_AT_CONNECT,
    REPLY_TOO_MANY_FROM_ADDRESS,
)
from gateway.intake.smtp_session import REPLY_SESSION_TOO_LONG
from tests.conftest import GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.ops_support import metric, running
from tests.test_smtp import (
    S220_READY,
    S250_OK,
    TIMEOUT,
    FakeSpool,
    Reply,
    Wire,
    _dot_stuff,
    _plain,
    eventually,
    listening,
    port_of,
    run,
    settings,
)


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users"
    path.write_text(f"helpdesk:{hash_password('right')}\n")
    return path


# -- item 16: no versions on the wire -------------------------------------------------------------


def test_no_reply_reveals_software_versions() -> None:
    """Banner, EHLO, HELP and error replies name no product version (aiosmtpd, Python)."""
    telltales = ("Python", "aiosmtpd", aiosmtpd.__version__, platform.python_version())
    commands = [
        "EHLO client",
        "HELO client",
        "HELP",
        "HELP MAIL",
        "NOOP",
        "VRFY postmaster",
        "XYZZY",
        "MAIL",
        "MAIL FROM:<a@helpdesk.example> BODY=WHATEVER",
        "RCPT TO:<nobody@nowhere.example>",
        "DATA now",
        "QUIT",
    ]

    async def scenario() -> None:
        async with listening(settings(), FakeSpool()) as listener:
            wire, greeting = await Wire.open(port_of(listener))
            assert greeting.code == S220_READY
            assert str(greeting) == "220 gateway.test ESMTP"
            replies = [greeting] + [await wire.cmd(line) for line in commands]
            await wire.close()
        for reply in replies:
            for telltale in telltales:
                assert telltale not in str(reply), (telltale, str(reply))
        assert replies[1].code == S250_OK

    run(scenario)


# -- helpers ----------------------------------------------------------------------------------


async def open_from(port: int, source: str) -> tuple[Wire, Reply]:
    """A client connecting from another loopback address (Linux routes all of 127/8 to lo)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    wire = Wire(reader, writer)
    return wire, await wire.reply()


async def closed_by_server(wire: Wire, timeout: float = TIMEOUT) -> list[bytes]:
    """Read until the server closes the connection; the lines it sent before. Fails at the
    deadline, which is far beyond the short limits the tests configure."""
    lines = []
    with contextlib.suppress(ConnectionResetError):  # a reset after the last line also ends it
        while line := await asyncio.wait_for(wire.reader.readline(), timeout):
            lines.append(line.rstrip(b"\r\n"))
    return lines


async def keep_alive(wire: Wire, every: float) -> list[str]:
    """NOOP just under the idle timeout, as a slot-hogging client does; the replies until the
    server closes the connection."""
    replies: list[str] = []
    with contextlib.suppress(ConnectionError, OSError):
        while True:
            replies.append(str(await wire.cmd("NOOP")))
            await asyncio.sleep(every)
    return replies


# -- item 14: connection slots are not held forever ---------------------------------------------


def test_noop_keepalive_cannot_hold_a_session_past_its_lifetime() -> None:
    async def scenario() -> None:
        smtp = settings(session_timeout_seconds=30, max_session_seconds=1.0)
        async with listening(smtp, FakeSpool()) as listener:
            wire, _ = await Wire.open(port_of(listener))
            replies = await asyncio.wait_for(keep_alive(wire, every=0.05), TIMEOUT)
            assert replies[-1] == REPLY_SESSION_TOO_LONG
            await eventually(lambda: listener.active_sessions == 0)
            assert listener.refusals.counts["session_lifetime"] == 1
            await wire.close()

    run(scenario)


def test_nothing_is_answered_after_the_lifetime_421() -> None:
    """A command the client pipelined behind its mail is read while the mail is committed and
    the lifetime ends meanwhile: the 250 for the mail goes out, then the 421 as the very last
    line; the pipelined NOOP gets no answer after it."""

    async def scenario() -> None:
        gate = asyncio.Event()
        spool = FakeSpool(gate=gate)
        async with listening(settings(max_session_seconds=1.0), spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            assert (await wire.cmd("DATA")).code == 354
            await wire.write(_dot_stuff(desk_mail("pipelined")) + b".\r\nNOOP\r\n")
            await eventually(lambda: spool.waiting == 1)
            await eventually(lambda: listener.refusals.counts["session_lifetime"] == 1)
            gate.set()
            lines = await closed_by_server(wire)
            await wire.close()
        assert lines[0].startswith(b"250 2.0.0 Ok: queued as ")
        assert lines[1:] == [REPLY_SESSION_TOO_LONG.encode()]

    run(scenario)


def test_data_trickle_cannot_hold_a_session_past_its_lifetime() -> None:
    """A line inside DATA every moment is activity, so only the lifetime ends it; nothing of
    the unfinished mail is stored (it was never acknowledged)."""

    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(session_timeout_seconds=30, max_session_seconds=1.0)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            assert (await wire.cmd("DATA")).code == 354

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError, OSError):
                    for i in range(10_000):
                        await wire.write(f"X-Line-{i}: still sending\r\n".encode())
                        await asyncio.sleep(0.05)

            dripping = asyncio.create_task(trickle())
            said = await closed_by_server(wire)
            assert said == [REPLY_SESSION_TOO_LONG.encode()]
            dripping.cancel()
            await wire.close()
            await eventually(lambda: listener.active_sessions == 0)
        assert spool.mails == []

    run(scenario)


def test_silent_data_times_out_before_the_session_timeout() -> None:
    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(session_timeout_seconds=60, data_timeout_seconds=0.5)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            await wire.cmd("MAIL FROM:<a@helpdesk.example>")
            await wire.cmd("RCPT TO:<desk@gw.example>")
            await wire.cmd("DATA")
            await wire.write(b"Subject: and then silence\r\n")
            assert await closed_by_server(wire) == []
            await wire.close()
            await eventually(lambda: listener.active_sessions == 0)
        assert spool.mails == []

    run(scenario)


def test_data_timeout_does_not_shorten_the_idle_timeout_after_data() -> None:
    """After a mail, the session waits for the next command under the normal idle timeout."""

    async def scenario() -> None:
        spool = FakeSpool()
        smtp = settings(session_timeout_seconds=60, data_timeout_seconds=0.3)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            assert (await wire.send_mail(desk_mail("first"))).code == S250_OK
            await asyncio.sleep(0.6)  # twice the DATA timeout, well inside the idle timeout
            assert (await wire.send_mail(desk_mail("second"))).code == S250_OK
            await wire.close()
        assert len(spool.mails) == 2

    run(scenario)


def test_a_commit_in_flight_at_the_end_of_the_lifetime_still_gets_its_250() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        spool = FakeSpool(gate=gate)
        smtp = settings(max_session_seconds=1.0)
        async with listening(smtp, spool) as listener:
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            sending = asyncio.create_task(wire.send_mail(desk_mail("committing")))
            await eventually(lambda: spool.waiting == 1)
            # the lifetime ends while the commit is pending: counted now, said after the 250
            await eventually(lambda: listener.refusals.counts["session_lifetime"] == 1)
            gate.set()
            assert (await sending).code == S250_OK
            assert await closed_by_server(wire) == [REPLY_SESSION_TOO_LONG.encode()]
            await wire.close()
        assert len(spool.mails) == 1

    run(scenario)


def test_one_address_cannot_take_every_slot() -> None:
    """Slot hoggers from one address get at most `max_unauthenticated_per_ip` sessions; a
    client from another address still gets in, and an authenticated session does not count."""

    async def scenario() -> None:
        smtp = settings(max_connections=10, max_unauthenticated_per_ip=3)
        async with listening(smtp, FakeSpool()) as listener:
            port = port_of(listener)
            hogs = [await Wire.open(port) for _ in range(3)]
            assert all(greeting.code == S220_READY for _, greeting in hogs)
            extra, refused = await Wire.open(port)
            assert str(refused) == REPLY_TOO_MANY_FROM_ADDRESS
            assert await closed_by_server(extra) == []
            other, greeting = await open_from(port, "127.0.0.2")
            assert greeting.code == S220_READY
            await other.cmd("EHLO other")
            assert (await other.send_mail(desk_mail("from elsewhere"))).code == S250_OK
            assert listener.refusals.counts["too_many_from_address"] == 1
            await hogs[0][0].cmd("QUIT")
            await eventually(lambda: listener.active_sessions == 3)
            again, greeting = await Wire.open(port)
            assert greeting.code == S220_READY
            for wire in [again, other, extra, *(w for w, _ in hogs)]:
                await wire.close()

    run(scenario)


def test_authenticated_sessions_do_not_count_against_the_address(users_file: Path) -> None:
    async def scenario() -> None:
        smtp = settings(max_unauthenticated_per_ip=1, auth_users_file=users_file, require_auth=True)
        async with listening(smtp, FakeSpool()) as listener:
            port = port_of(listener)
            first, _ = await Wire.open(port)
            await first.cmd("EHLO client")
            assert (await first.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")).code == 235
            second, greeting = await Wire.open(port)  # the first no longer counts
            assert greeting.code == S220_READY
            third, refused = await Wire.open(port)  # the second does
            assert str(refused) == REPLY_TOO_MANY_FROM_ADDRESS
            for wire in (first, second, third):
                await wire.close()

    run(scenario)


# -- item 13: password guessing is slowed, then stopped, per address ----------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_auth_delay_grows_then_the_address_is_locked_out() -> None:
    clock = Clock()
    throttle = AuthThrottle(max_failures=6, lockout_seconds=300, max_delay=2.0, clock=clock)
    delays = [throttle.failed("192.0.2.7").delay for _ in range(5)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert throttle.locked_for("192.0.2.7") == 0 and throttle.locked_for("192.0.2.8") == 0
    assert throttle.failed("192.0.2.7").locked  # the sixth within the window
    assert throttle.locked_for("192.0.2.7") == 300
    clock.now += 299
    assert throttle.locked_for("192.0.2.7") == 1
    clock.now += 1
    assert throttle.locked_for("192.0.2.7") == 0
    assert throttle.failed("192.0.2.7").delay == 0.25  # a fresh start after the lockout


def test_failures_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    throttle = AuthThrottle(max_failures=3, lockout_seconds=60, max_delay=1.0, clock=clock)
    for _ in range(10):  # one typo a minute never locks anyone out
        throttle.failed("192.0.2.7")
        clock.now += 61
    assert throttle.locked_for("192.0.2.7") == 0 and throttle.failures("192.0.2.7") == 1


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        pytest.param(("192.0.2.7", 2525), "192.0.2.7", id="ipv4"),
        pytest.param(("2001:db8::1", 2525, 0, 0), "2001:db8::/64", id="ipv6-by-64"),
        pytest.param(("2001:db8::ffff:1", 2525, 0, 0), "2001:db8::/64", id="same-64"),
        pytest.param(("::ffff:192.0.2.7", 2525, 0, 0), "192.0.2.7", id="ipv4-mapped"),
        pytest.param("/run/gateway.sock", "/run/gateway.sock", id="unix"),
    ],
)
def test_client_key(peer: object, key: str) -> None:
    assert client_key(peer) == key


def test_refusals_are_counted_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    refusals = Refusals(burst=3, interval=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="gateway.intake.smtp_limits"):
        for i in range(10):
            refusals.record("auth_failed", ("192.0.2.7", 40000 + i), f"AUTH PLAIN failed #{i}")
        clock.now += 60
        refusals.record("auth_locked_out", ("192.0.2.8", 1), "AUTH refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == [f"smtp 192.0.2.7:{40000 + i}: AUTH PLAIN failed #{i}" for i in range(3)]
    assert lines[3:] == ["smtp 192.0.2.8:1: AUTH refused (7 more refusals not logged)"]
    assert refusals.counts["auth_failed"] == 10 and refusals.counts["auth_locked_out"] == 1


def test_parallel_password_guessing_gets_only_max_failures_answers(
    users_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """20 parallel clients from one address guess away (the attack of issue 11 made 392
    attempts in 23 s): only `auth_max_failures` wrong guesses are answered at all; then AUTH
    says 454 4.7.0, even to the right password, and new connections get 421 4.7.0. Another
    address is not affected."""
    smtp = settings(
        require_auth=True,
        auth_users_file=users_file,
        max_unauthenticated_per_ip=100,  # not under test here: every guesser gets in
        auth_max_failures=4,
        auth_lockout_seconds=600,
        auth_failure_delay_seconds=0.05,
    )
    answers: list[str] = []

    async def guesser(port: int, n: int) -> None:
        for attempt in range(10):  # bounded: without a lockout this makes 200 guesses
            wire, greeting = await Wire.open(port)
            if greeting.code != S220_READY:
                answers.append(str(greeting))
                await wire.close()
                return
            await wire.cmd("EHLO guesser")
            for guess in range(3):
                reply = await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', f'{n}-{attempt}-{guess}')}")
                answers.append(str(reply))
                if reply.code != 535:
                    break
            await wire.close()

    async def scenario() -> None:
        async with listening(smtp, FakeSpool()) as listener:
            port = port_of(listener)
            await asyncio.gather(*(guesser(port, n) for n in range(20)))
            wire, greeting = await Wire.open(port)
            assert str(greeting) == REPLY_AUTH_LOCKED_OUT_AT_CONNECT
            other, _ = await open_from(port, "127.0.0.2")
            await other.cmd("EHLO other")
            assert (await other.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")).code == 235
            counts = dict(listener.refusals.counts)
            for w in (wire, other):
                await w.close()
        wrong = [a for a in answers if a.startswith("535")]
        assert len(wrong) == 4, answers
        assert answers.count(REPLY_AUTH_LOCKED_OUT_AT_CONNECT) == 20  # each guesser, in the end
        assert counts["auth_failed"] == 4 and counts["auth_locked_out"] >= 1
        logged = [r.getMessage() for r in caplog.records if "AUTH" in r.getMessage()]
        assert any("127.0.0.1:" in line and "failed" in line for line in logged)
        assert len(logged) <= 20  # rate-limited

    with caplog.at_level(logging.WARNING):
        run(scenario)


def test_locked_out_address_gets_454_even_for_the_right_password(users_file: Path) -> None:
    smtp = settings(auth_users_file=users_file, auth_max_failures=2, auth_failure_delay_seconds=0.0)

    async def scenario() -> None:
        async with listening(smtp, FakeSpool()) as listener:
            wire, greeting = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client")
            assert (await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'a')}")).code == 535
            assert (await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'b')}")).code == 535
            right = await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', 'right')}")
            assert str(right) == REPLY_AUTH_LOCKED_OUT
            # AUTH is optional here (no require_auth): mail still flows, unauthenticated
            assert (await wire.send_mail(desk_mail("still welcome"))).code == S250_OK
            await wire.close()
            again, greeting = await Wire.open(port_of(listener))
            assert greeting.code == S220_READY  # connections are refused only with require_auth
            await again.close()

    run(scenario)


def test_password_guessing_against_gateway_serve_is_stopped_logged_and_counted(
    tmp_path: Path, users_file: Path
) -> None:
    """The attack of issue 11 against the real `gateway serve`: 20 parallel guessers. Only
    `auth_max_failures` guesses get an answer; the log has a line per refusal with the peer
    (rate-limited); `/metrics` counts them."""
    port, web_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        pd_url="http://127.0.0.1:9/v2/enqueue",  # no mail is sent here, so nothing posts
        smtp_port=port,
        smtp_extra=(
            f'auth_users_file = "{users_file}"\nrequire_auth = true\n'
            "auth_max_failures = 5\nauth_failure_delay_seconds = 0.1\n"
            "max_unauthenticated_per_ip = 100\n"  # not under test here: every guesser gets in
        ),
        extra=f'[web]\nlisten = "127.0.0.1:{web_port}"\n',
    )
    answers: list[str] = []

    async def guesser(n: int) -> None:
        for attempt in range(10):  # bounded: without a lockout this makes 200 guesses
            wire, greeting = await Wire.open(port)
            if greeting.code != S220_READY:
                answers.append(str(greeting))
                await wire.close()
                return
            await wire.cmd("EHLO guesser")
            reply = await wire.cmd(f"AUTH PLAIN {_plain('helpdesk', f'{n}-{attempt}')}")
            answers.append(str(reply))
            await wire.close()

    async def attack() -> None:
        await asyncio.gather(*(guesser(n) for n in range(20)))

    with running(config, port, web_port) as gateway:
        run(attack)
        text = gateway.get("/metrics")[1]
        log = gateway.output()
    assert sum(a.startswith("535") for a in answers) == 5, answers
    assert metric(text, "gateway_smtp_refusals_total", reason="auth_failed") == 5
    # each guesser ends with a 421 at connect; some met a 454 at AUTH before that
    assert (metric(text, "gateway_smtp_refusals_total", reason="auth_locked_out") or 0) >= 20
    lines = [line for line in log.splitlines() if "smtp 127.0.0.1:" in line]
    assert any("AUTH PLAIN failed for 'helpdesk'" in line for line in lines), log[-6000:]
    assert any("Too many failed authentication attempts" in line for line in lines)
    assert len(lines) <= 21 and "Traceback" not in log  # 20 a minute, and a note of the rest


def test_slot_hoggers_do_not_lock_out_other_senders_end_to_end(tmp_path: Path) -> None:
    """Issue 11's lock-out against `gateway serve`: clients on one address keep sessions open
    with NOOPs; they get at most `max_unauthenticated_per_ip` slots, a helpdesk on another
    address still delivers, and the hoggers are cut at `max_session_seconds`."""
    port = free_port()
    config = write_config(
        tmp_path,
        pd_url="http://127.0.0.1:9/v2/enqueue",  # no mail is sent here, so nothing posts
        smtp_port=port,
        smtp_extra="max_connections = 12\nmax_unauthenticated_per_ip = 8\nmax_session_seconds = 2",
    )

    async def scenario() -> None:
        hogs = [await Wire.open(port) for _ in range(30)]
        admitted = [wire for wire, greeting in hogs if greeting.code == S220_READY]
        refused = [str(greeting) for _, greeting in hogs if greeting.code != S220_READY]
        assert 1 <= len(admitted) <= 8 and set(refused) == {REPLY_TOO_MANY_FROM_ADDRESS}
        keeping = [asyncio.create_task(keep_alive(wire, every=0.1)) for wire in admitted]
        helpdesk, greeting = await open_from(port, "127.0.0.2")
        assert greeting.code == S220_READY
        await helpdesk.cmd("EHLO helpdesk")
        assert (await helpdesk.send_mail(desk_mail("Delivered despite hoggers"))).code == S250_OK
        await helpdesk.close()
        ends = await asyncio.wait_for(asyncio.gather(*keeping), TIMEOUT)
        assert all(replies[-1] == REPLY_SESSION_TOO_LONG for replies in ends), ends
        for wire, _ in hogs:
            await wire.close()

    gateway = GatewayProcess(config, port).start()
    try:
        run(scenario)
        wait_until(lambda: "key='Delivered despite hoggers'" in gateway.output())
        assert gateway.stop() == 0
    finally:
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.kill()
    assert "Traceback" not in gateway.output()
