"""IMAP poller: unit pieces with fakes, the poller in-process against a real Dovecot, and the
whole path (Dovecot -> `gateway serve` -> PagerDuty stand-in) through a real subprocess."""

from __future__ import annotations

import io
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from imapclient import SEEN, SocketTimeout
from imapclient.exceptions import LoginError

from gateway.config import ImapSettings, WebSettings, load_config
from gateway.errors import ConfigError
from gateway.intake import imap
from gateway.intake.imap import (
    Backoff,
    FolderSync,
    ImapAuthError,
    ImapError,
    ImapPoller,
    UnreadablePolicy,
    compat,
)
from gateway.intake.spool import SpoolWriter
from gateway.store import ImapPosition, open_store
from gateway.web import health
from tests.conftest import ROOT, GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.dovecot import OAUTH_TOKEN, OAUTH_USER, PASSWORD, USER, Dovecot, require_dovecot

FAST = Backoff(initial=0.1, maximum=0.5, jitter=0.0)


# -- fixtures ---------------------------------------------------------------------------------


def _start_dovecot(directory: Path, tls: trustme.CA | None = None) -> Iterator[Dovecot]:
    require_dovecot()
    directory.mkdir()
    server = Dovecot(directory, tls=tls).start()
    try:
        yield server
    finally:
        server.stop()
        print(f"--- dovecot log ---\n{server.output()}", file=sys.stderr)  # shown on failure


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    yield from _start_dovecot(tmp_path / "dovecot")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def dovecot_tls(tmp_path: Path, ca: trustme.CA) -> Iterator[Dovecot]:
    yield from _start_dovecot(tmp_path / "dovecot", tls=ca)


def account_for(server: Dovecot, **overrides: Any) -> ImapSettings:
    values: dict[str, Any] = {
        "name": "desk",
        "host": server.host,
        "port": server.port,
        "security": "none",
        "username": USER,
        "password": PASSWORD,
        "service": "helpdesk",
        "poll_seconds": 0.2,
    }
    return ImapSettings(**(values | overrides))


class Harness:
    """An in-process poller setup: spool writer, a reading Store, pollers stopped at teardown."""

    def __init__(self, directory: Path, server: Dovecot) -> None:
        self.server = server
        self.db = directory / "gateway.sqlite3"
        self.spool = SpoolWriter(self.db)
        self.spool.start()
        self.store = open_store(self.db)
        self.pollers: list[ImapPoller] = []

    def settings(self, **overrides: Any) -> ImapSettings:
        return account_for(self.server, **overrides)

    def poller(
        self,
        backoff: Backoff = FAST,
        connect_fn: Any = imap.connect,
        unreadable: UnreadablePolicy | None = None,
        **overrides: Any,
    ) -> ImapPoller:
        poller = ImapPoller(
            self.settings(**overrides),
            self.spool,
            self.db,
            backoff=backoff,
            connect_fn=connect_fn,
            unreadable=unreadable,
        )
        poller.start()
        self.pollers.append(poller)
        return poller

    def count(self, where: str = "1=1") -> int:
        return self.store.conn.execute(f"SELECT COUNT(*) FROM messages WHERE {where}").fetchone()[0]

    def wait_count(self, n: int, timeout: float = 10.0) -> None:
        try:
            wait_until(lambda: self.count() >= n, timeout)
        except AssertionError:
            raise AssertionError(f"expected {n} spooled messages, got {self.count()}") from None

    def close(self) -> None:
        for poller in self.pollers:
            poller.stop()
        self.spool.stop()
        self.store.close()


@pytest.fixture
def harness(tmp_path: Path, dovecot: Dovecot) -> Iterator[Harness]:
    h = Harness(tmp_path, dovecot)
    yield h
    h.close()


def folder_state(server: Dovecot, folder: str = "INBOX") -> dict[int, tuple[bytes, ...]]:
    """UID -> flags of every message in `folder` (seen from a separate session)."""
    with server.client() as client:
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        return {uid: data[b"FLAGS"] for uid, data in client.fetch(uids, ["FLAGS"]).items()}


# -- unit pieces ------------------------------------------------------------------------------


def test_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff(initial=1, maximum=300, factor=2, jitter=0.2)
    assert [backoff.delay(n, lambda: 0.5) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff.delay(30, lambda: 0.5) == 300
    assert backoff.delay(3, lambda: 0.0) == pytest.approx(3.2)
    assert backoff.delay(3, lambda: 1.0) == pytest.approx(4.8)
    assert backoff.delay(30, lambda: 1.0) == 300  # jitter never exceeds the cap


class FakeClient:
    """Records the login calls; optionally refuses them like a server would."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, str, str]] = []

    def login(self, user: str, password: str) -> None:
        self.calls.append(("login", user, password))
        if self.refuse:
            raise LoginError("b'[AUTHENTICATIONFAILED] Authentication failed.'")

    def oauth2_login(self, user: str, token: str) -> None:
        self.calls.append(("oauth2", user, token))
        if self.refuse:
            raise LoginError("b'[AUTHENTICATIONFAILED] Authentication failed.'")


def _account(**overrides: Any) -> ImapSettings:
    values = {
        "name": "m365",
        "host": "outlook.office365.com",
        "service": "helpdesk",
        "username": "alerts@example.com",
    }
    return ImapSettings(**(values | overrides))


class TestLogin:
    def test_password(self) -> None:
        client = FakeClient()
        imap.login(client, _account(password="pw"))  # type: ignore[arg-type]
        assert client.calls == [("login", "alerts@example.com", "pw")]

    def test_oauth2_token_from_config(self) -> None:
        client = FakeClient()
        imap.login(client, _account(oauth2_token="tok-123"))  # type: ignore[arg-type]
        assert client.calls == [("oauth2", "alerts@example.com", "tok-123")]

    def test_oauth2_token_command_runs_on_every_login(self, tmp_path: Path) -> None:
        counter = tmp_path / "runs"
        settings = _account(oauth2_token_command=f"echo run >> {counter}; printf 'tok-456\\n'")
        client = FakeClient()
        imap.login(client, settings)  # type: ignore[arg-type]
        imap.login(client, settings)  # type: ignore[arg-type]
        assert client.calls == [("oauth2", "alerts@example.com", "tok-456")] * 2
        assert counter.read_text().count("run") == 2

    @pytest.mark.parametrize(
        "command",
        [
            pytest.param("echo oops >&2; exit 3", id="fails"),
            pytest.param("true", id="prints-nothing"),
        ],
    )
    def test_oauth2_token_command_failure_is_an_auth_error(self, command: str) -> None:
        with pytest.raises(ImapAuthError, match="oauth2_token_command failed"):
            imap.oauth2_token(_account(oauth2_token_command=command))

    def test_refused_login_is_an_auth_error(self) -> None:
        with pytest.raises(
            ImapAuthError, match=r"authentication failed for alerts@example.com: \[AUTH"
        ):
            imap.login(FakeClient(refuse=True), _account(password="bad"))  # type: ignore[arg-type]


def test_keepalive_setting_bounds_every_socket_read(tmp_path: Path) -> None:
    table = '[[imap]]\nname = "desk"\nhost = "h"\nusername = "u"\npassword = "p"\n'
    table += 'service = "helpdesk"\n'
    config = load_config(write_config(tmp_path, extra=table + "keepalive_seconds = 4\n"))
    assert imap.timeouts(config.imap[0]) == SocketTimeout(connect=6.0, read=6.0)
    default = load_config(write_config(tmp_path, extra=table)).imap[0]
    assert default.keepalive_seconds == 20.0  # a hung server shows in about 50 s
    assert imap.timeouts(default) == SocketTimeout(connect=15.0, read=30.0)
    with pytest.raises(ConfigError, match=r"keepalive_seconds.*at most 1500"):
        load_config(write_config(tmp_path, extra=table + "keepalive_seconds = 0\n"))


class DeadIdleClient:
    """What imapclient does after the peer vanished: idle_check returns [] at once, forever."""

    _imap = SimpleNamespace(file=io.BufferedReader(io.BytesIO(b"")))  # nothing left unread

    def socket(self) -> Any:
        return SimpleNamespace(gettimeout=lambda: None, settimeout=lambda timeout: None)

    def idle(self) -> None:
        pass

    def idle_check(self, timeout: float) -> list[Any]:
        return []

    def idle_done(self) -> None:
        raise AssertionError("must not be reached")


def test_instant_empty_idle_checks_mean_a_dead_connection(tmp_path: Path) -> None:
    poller = ImapPoller(_account(password="x"), SpoolWriter(tmp_path / "db"), tmp_path / "db")
    started = time.monotonic()
    with pytest.raises(ImapError, match="connection lost during IDLE"):
        poller._idle(DeadIdleClient())  # type: ignore[arg-type]
    assert time.monotonic() - started < 0.5


# -- the poller against a real Dovecot --------------------------------------------------------


class TestAfterActions:
    def test_seen_processes_by_uid_even_if_a_human_read_it(self, harness: Harness) -> None:
        harness.server.append(desk_mail("already read by a human"), flags=(SEEN,))
        harness.server.append(desk_mail("unread"))
        harness.poller(after="seen")
        harness.wait_count(2)
        wait_until(lambda: all(SEEN in f for f in folder_state(harness.server).values()))
        assert len(folder_state(harness.server)) == 2  # left in place
        assert harness.store.imap_position("desk", "INBOX")[1] == 2  # type: ignore[index]

    def test_delete_expunges_processed_mail(self, harness: Harness) -> None:
        for n in range(3):
            harness.server.append(desk_mail(f"delete me {n}"))
        harness.poller(after="delete")
        harness.wait_count(3)
        wait_until(lambda: folder_state(harness.server) == {}, message="INBOX not emptied")

    def test_move_creates_the_folder_and_moves(self, harness: Harness) -> None:
        harness.server.append(desk_mail("move me"))
        harness.poller(after="move:Processed")
        harness.wait_count(1)
        wait_until(lambda: folder_state(harness.server) == {})
        assert len(folder_state(harness.server, "Processed")) == 1

    def test_oversize_left_in_place_and_reported_once(self, harness: Harness) -> None:
        harness.server.append(desk_mail("huge", extra="x" * 5000))
        harness.server.append(desk_mail("small"))
        harness.poller(after="seen", max_message_bytes=2000)
        harness.wait_count(1)
        harness.server.append(desk_mail("small again"))
        harness.wait_count(2)
        flags = folder_state(harness.server)
        wait_until(lambda: SEEN in folder_state(harness.server)[3])
        assert SEEN not in flags[1]  # the big one is untouched
        events = harness.store.conn.execute(
            "SELECT detail FROM events WHERE kind = 'imap_oversize'"
        ).fetchall()
        assert len(events) == 1 and "UID 1" in events[0][0]


def test_polling_mode_when_idle_is_off(harness: Harness) -> None:
    poller = harness.poller(idle=False, poll_seconds=0.2)
    wait_until(lambda: poller.state == "polling")
    harness.server.append(desk_mail("polled"))
    harness.wait_count(1)
    assert poller.last_success is not None


def test_restart_processes_mail_from_downtime_once(harness: Harness) -> None:
    harness.server.append(desk_mail("one"))
    first = harness.poller(after="seen")
    harness.wait_count(1)
    first.stop()
    harness.server.append(desk_mail("two"))
    harness.server.append(desk_mail("three"))
    second = harness.poller(after="seen")
    harness.wait_count(3)
    harness.server.append(desk_mail("four"))  # a sync point: everything before it is done
    harness.wait_count(4)
    wait_until(lambda: second.last_success)
    assert harness.count() == 4
    assert harness.count("duplicate_of IS NOT NULL") == 0


def test_imap_worker_killed_mid_idle_reconnects(harness: Harness) -> None:
    poller = harness.poller()
    wait_until(lambda: poller.state == "idle" and harness.server.imap_worker_pids())
    assert harness.server.kill_imap_workers()
    harness.server.append(desk_mail("after the crash"))
    harness.wait_count(1)
    wait_until(lambda: poller.state == "idle")
    assert poller.attempts == 2


def test_wrong_password_backs_off_and_says_why(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[float] = []

    def counting_connect(settings: ImapSettings) -> Any:
        attempts.append(time.monotonic())
        return imap.connect(settings)

    caplog.set_level(logging.DEBUG, logger="gateway.intake.imap")
    backoff = Backoff(initial=0.2, factor=2.0, maximum=0.4, jitter=0.0)
    poller = harness.poller(password="wrong", backoff=backoff, connect_fn=counting_connect)
    wait_until(lambda: len(attempts) >= 4, timeout=10)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.19 and gaps[1] >= 0.39 and gaps[2] >= 0.39  # exponential, capped
    assert "authentication failed" in poller.state
    errors = [
        r for r in caplog.records if r.name == "gateway.intake.imap" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, "the same failure is logged once, not on every retry"
    assert "authentication failed for alerts" in errors[0].getMessage()
    started = time.monotonic()
    poller.stop()
    assert time.monotonic() - started < 2


def test_stop_interrupts_idle_and_backoff_promptly(harness: Harness) -> None:
    idling = harness.poller()
    wait_until(lambda: idling.state == "idle")
    waiting = harness.poller(name="other", password="wrong", backoff=Backoff(initial=60, jitter=0))
    wait_until(lambda: waiting.state.startswith("error"))
    for poller in (idling, waiting):
        started = time.monotonic()
        poller.stop()
        assert time.monotonic() - started < 2
        assert poller.state == "stopped"


def test_uidvalidity_change_rescans_without_double_action(harness: Harness) -> None:
    harness.server.append(desk_mail("first"))
    harness.server.append(desk_mail("second"))
    # A short keepalive (IDLE renewal): its fetch cycle is where a changed mailbox shows up.
    poller = harness.poller(after="seen", keepalive_seconds=0.5)
    harness.wait_count(2)
    wait_until(lambda: poller.state == "idle")
    harness.server.doveadm("mailbox", "update", "-u", USER, "--uid-validity", "12345", "INBOX")
    # Dovecot ends the session whose view became inconsistent; the poller reconnects, sees the
    # new UIDVALIDITY and fetches both messages again.
    wait_until(lambda: harness.store.imap_position("desk", "INBOX") == (12345, 2))
    assert harness.count() == 4
    assert harness.count("duplicate_of IS NOT NULL") == 2
    jobs = harness.store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert jobs == 2  # duplicates never become work


def test_xoauth2_with_token_command_against_dovecot(harness: Harness, tmp_path: Path) -> None:
    runs = tmp_path / "token-runs"
    command = f"echo run >> {runs}; echo {OAUTH_TOKEN}"
    harness.server.append(desk_mail("for the oauth mailbox"), user=OAUTH_USER)
    poller = harness.poller(username=OAUTH_USER, password=None, oauth2_token_command=command)
    harness.wait_count(1)
    wait_until(lambda: poller.state == "idle")
    harness.server.kill_imap_workers()
    wait_until(lambda: poller.attempts == 2 and poller.state == "idle")
    assert runs.read_text().count("run") == 2  # a fresh token for every connection
    assert "method=XOAUTH2" in harness.server.output()


# -- nothing skipped, nothing lost, no frozen server unnoticed (issue 11, items 1-3) ------------

QUICK_RETRY = UnreadablePolicy(Backoff(initial=0.2, maximum=0.5, jitter=0.0), report_after=3)


def subjects(h: Harness) -> list[str]:
    """Subjects of the spooled mail that was not a duplicate, in acceptance order."""
    rows = h.store.conn.execute("SELECT raw FROM messages WHERE raw IS NOT NULL ORDER BY id")
    return [message_from_bytes(raw)["Subject"] for (raw,) in rows]


def events(h: Harness, kind: str) -> list[str]:
    rows = h.store.conn.execute("SELECT detail FROM events WHERE kind = ? ORDER BY id", (kind,))
    return [detail for (detail,) in rows]


class Seam:
    """The fault-injection seam: a real, connected IMAPClient (through the poller's
    `connect_fn`) whose named methods a test may wrap; everything else is the real client.

    This stands in for a misbehaving server where real Dovecot cannot be made to misbehave on
    cue (an answer that leaves a message out, a connection dropped right after a commit).
    """

    def __init__(self, client: Any, **overrides: Any) -> None:
        self._client = client
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return lambda *args, **kwargs: self._overrides[name](self._client, *args, **kwargs)
        return getattr(self._client, name)


def leaving_out(uid: int, item: str, times: int | None, garble: bool = False) -> Any:
    """A FETCH that leaves `uid` out of its answers for `item` (`times` times; None: always),
    or (`garble`) answers nonsense for it."""
    left = [times]

    def fetch(client: Any, uids: Any, data: Any) -> Any:
        answer = client.fetch(uids, data)
        if item in data and uid in answer and (left[0] is None or left[0] > 0):
            if garble:
                answer[uid] = {key: b"NIL?" for key in answer[uid]}
            else:
                del answer[uid]
            left[0] = None if left[0] is None else left[0] - 1
        return answer

    return fetch


def test_unreadable_message_does_not_block_the_rest_and_is_reported(harness: Harness) -> None:
    for name in "ABCD":
        harness.server.append(desk_mail(f"case {name}"))
    # A real server fault: Dovecot cannot open the file, answers "FETCH failed" and hangs up.
    harness.server.message_file(2).chmod(0)  # Dovecot moves it from new/ to cur/ later
    harness.poller(after="seen", unreadable=QUICK_RETRY)
    harness.wait_count(3)
    wait_until(lambda: events(harness, "imap_unreadable"), message="no imap_unreadable event")
    assert subjects(harness) == ["case A", "case C", "case D"]
    [failure] = harness.store.imap_failures()
    assert (failure.uid, failure.reported_at is not None) == (2, True)
    assert failure.attempts >= 3 and "FETCH failed" in failure.error
    assert "UID 2" in events(harness, "imap_unreadable")[0]
    gauges = {(m, labels): v for m, labels, v in harness.store.metric_gauges()}
    assert gauges[("imap_unreadable", ("desk",))] == 1
    flags = folder_state(harness.server)
    assert [SEEN in flags[uid] for uid in (1, 2, 3, 4)] == [True, False, True, True]
    harness.server.message_file(2).chmod(0o600)  # fixed on the server: the next retry takes it
    harness.wait_count(4)
    wait_until(lambda: harness.store.imap_failures() == [], message="still owed")
    assert subjects(harness)[-1] == "case B"
    wait_until(lambda: SEEN in folder_state(harness.server)[2])
    assert harness.count("duplicate_of IS NOT NULL") == 0


@pytest.mark.parametrize(
    "item",
    [pytest.param("RFC822.SIZE", id="size-answer"), pytest.param("BODY.PEEK[]", id="body-answer")],
)
def test_message_left_out_of_an_answer_is_retried_not_skipped(harness: Harness, item: str) -> None:
    for name in "ABC":
        harness.server.append(desk_mail(f"case {name}"))
    fetch = leaving_out(2, item, times=2)
    harness.poller(
        after="seen",
        unreadable=QUICK_RETRY,
        connect_fn=lambda settings: Seam(imap.connect(settings), fetch=fetch),
    )
    harness.wait_count(3)
    assert sorted(subjects(harness)) == ["case A", "case B", "case C"]
    wait_until(lambda: harness.store.imap_failures() == [])
    assert harness.store.imap_position("desk", "INBOX")[1] == 3  # type: ignore[index]
    assert events(harness, "imap_vanished") == []


def test_nonsense_size_answer_is_owed_and_stalls_nothing(harness: Harness) -> None:
    for name in "ABC":
        harness.server.append(desk_mail(f"case {name}"))
    fetch = leaving_out(2, "RFC822.SIZE", times=None, garble=True)
    harness.poller(
        after="seen",
        unreadable=QUICK_RETRY,
        connect_fn=lambda settings: Seam(imap.connect(settings), fetch=fetch),
    )
    harness.wait_count(2)
    wait_until(lambda: [f.uid for f in harness.store.imap_failures()] == [2])
    assert subjects(harness) == ["case A", "case C"]


def test_owed_message_that_vanishes_is_reported_and_forgotten(harness: Harness) -> None:
    for name in "ABC":
        harness.server.append(desk_mail(f"case {name}"))
    fetch = leaving_out(2, "RFC822.SIZE", times=None)
    harness.poller(
        after="seen",
        unreadable=QUICK_RETRY,
        connect_fn=lambda settings: Seam(imap.connect(settings), fetch=fetch),
    )
    harness.wait_count(2)
    wait_until(lambda: [f.uid for f in harness.store.imap_failures()] == [2])
    with harness.server.client() as other:  # someone deletes it in their mail client
        other.select_folder("INBOX")
        other.delete_messages([2])
        other.expunge()
    wait_until(lambda: events(harness, "imap_vanished"), message="no imap_vanished event")
    assert "UID 2" in events(harness, "imap_vanished")[0]
    assert harness.store.imap_failures() == []
    assert subjects(harness) == ["case A", "case C"]


def test_imapclient_outside_the_checked_range_is_refused() -> None:
    compat.check_imapclient_version("3.0.1")
    compat.check_imapclient_version("4.1.0")
    with pytest.raises(compat.UnsupportedImapclientError, match=r"imapclient>=3.0,<5"):
        compat.check_imapclient_version("5.0.0")


def test_mail_announced_during_a_search_is_taken_in_the_same_cycle(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """Dovecot runs SEARCH on its view before syncing, and announces mail that landed
    meanwhile only in the SEARCH's answer; IDLE never announces it again."""
    dovecot.append(desk_mail("first"))
    store = open_store(tmp_path / "db.sqlite3")
    settings = account_for(dovecot)
    client = imap.connect(settings)
    landed: list[bool] = []

    def search(real: Any, criteria: Any) -> Any:
        if criteria[1] == "2:*" and not landed:
            landed.append(True)
            dovecot.append(desk_mail("landed during the search"))
        return real.search(criteria)

    try:
        sync = FolderSync(settings, store, store.accept)
        sync.open(client)
        assert sync.run(Seam(client, search=search)).accepted == 2  # type: ignore[arg-type]
        assert landed
    finally:
        imap.close(client)
        store.close()


def test_mail_announced_with_the_idle_continuation_ends_that_idle(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    """Mail that lands just before IDLE is announced in the same packet as "+ idling": imaplib
    reads both, and idle_check, which polls the socket, would wait for the keepalive."""
    settings = account_for(dovecot, keepalive_seconds=600.0)
    poller = ImapPoller(settings, SpoolWriter(tmp_path / "db"), tmp_path / "db")  # not started
    client = imap.connect(settings)
    done = threading.Event()
    try:
        client.select_folder("INBOX")
        dovecot.append(desk_mail("landed just before IDLE"))
        idling = threading.Thread(target=lambda: (poller._idle(client), done.set()), daemon=True)
        idling.start()
        wait_until(done.is_set, timeout=10, message="the announcement was left in the buffer")
    finally:
        poller._stop.set()  # ends the IDLE loop if it is still waiting
        wait_until(lambda: done.is_set() or not idling.is_alive(), timeout=5)
        imap.close(client)


def test_stop_right_after_the_commit_finishes_the_batch(harness: Harness) -> None:
    harness.server.append(desk_mail("one"))
    poller = ImapPoller(harness.settings(after="seen"), harness.spool, harness.db, backoff=FAST)
    stopped: list[bool] = []

    def stop_once() -> None:  # SIGTERM arriving right between the commit and the \Seen flag
        if not stopped:
            stopped.append(True)
            poller.stop()

    harness.spool.on_commit(stop_once)
    poller.start()
    harness.pollers.append(poller)
    wait_until(lambda: poller.state == "stopped" and stopped)
    assert harness.count() == 1
    assert SEEN in folder_state(harness.server)[1], "stopped between commit and after-action"
    assert harness.store.imap_position("desk", "INBOX")[1] == 1  # type: ignore[index]
    assert harness.store.imap_unfinished("desk", "INBOX") == []


def test_after_action_cut_by_a_lost_connection_is_finished_without_refetch(
    harness: Harness,
) -> None:
    harness.server.append(desk_mail("one"))
    cut: list[bool] = []

    def add_flags(real: Any, *args: Any, **kwargs: Any) -> Any:
        if not cut:  # the connection drops right after the commit, before \Seen is set
            cut.append(True)
            imap.connection.interrupt(real)
        return real.add_flags(*args, **kwargs)

    poller = harness.poller(
        after="seen", connect_fn=lambda settings: Seam(imap.connect(settings), add_flags=add_flags)
    )
    wait_until(lambda: SEEN in folder_state(harness.server).get(1, ()))
    wait_until(lambda: poller.attempts >= 2 and poller.state == "idle")
    harness.server.append(desk_mail("two"))  # a sync point: everything before it is done
    harness.wait_count(2)
    # The count grows at the acceptance commit; mail two's own \\Seen (and the clearing of
    # its unfinished mark) follows it, so wait for that rather than race it.
    wait_until(lambda: SEEN in folder_state(harness.server).get(2, ()))
    wait_until(
        lambda: harness.store.imap_unfinished("desk", "INBOX") == [],
        message="an after-action was left unfinished",
    )
    assert harness.count("duplicate_of IS NOT NULL") == 0, "the message was fetched again"


def test_after_action_left_unfinished_by_a_crash_is_applied_at_start(harness: Harness) -> None:
    harness.server.append(desk_mail("one"))
    with harness.server.client() as other:
        uidvalidity = other.select_folder("INBOX", readonly=True)[b"UIDVALIDITY"]
    # What a kill -9 right after the acceptance commit leaves behind: the mail and the
    # position committed, the \\Seen flag never set.
    raw = harness.server.message_file(1).read_bytes()
    mail = FolderSync(harness.settings(), harness.store, harness.store.accept).incoming(raw)
    harness.store.accept([mail], [ImapPosition("desk", "INBOX", uidvalidity, 1, unfinished=(1,))])
    poller = harness.poller(after="seen")
    wait_until(lambda: SEEN in folder_state(harness.server)[1], message="after-action not done")
    wait_until(lambda: poller.state == "idle")
    assert harness.count() == 1  # not fetched again
    assert harness.store.imap_unfinished("desk", "INBOX") == []


@pytest.mark.parametrize("idle", [pytest.param(True, id="idle"), pytest.param(False, id="polling")])
def test_frozen_server_is_noticed_and_mail_delivered_meanwhile_is_taken_once(
    harness: Harness, idle: bool
) -> None:
    keepalive = 1.0  # the default is 20 s: a frozen server shows in about 50 s
    poller = harness.poller(idle=idle, poll_seconds=60.0, keepalive_seconds=keepalive)
    harness.server.append(desk_mail("before"))
    harness.wait_count(1)
    wait_until(lambda: poller.state == ("idle" if idle else "polling") and poller.healthy)
    harness.server.freeze()
    try:
        # 2.5 keepalive intervals, with room for a loaded machine
        wait_until(lambda: not poller.healthy, timeout=10 * keepalive)
        assert poller.state.startswith("error: ") and "did not answer" in poller.state
        assert not imap_health(poller)["ok"]
        harness.server.deliver(desk_mail("while frozen"))
    finally:
        harness.server.thaw()
    harness.wait_count(2, timeout=30)
    wait_until(lambda: poller.healthy and poller.state == ("idle" if idle else "polling"))
    assert imap_health(poller)["ok"]
    harness.server.append(desk_mail("after"))  # a sync point: everything before it is done
    harness.wait_count(3)
    assert subjects(harness) == ["before", "while frozen", "after"]
    assert harness.count("duplicate_of IS NOT NULL") == 0


def imap_health(poller: ImapPoller) -> dict[str, Any]:
    """The account's entry in /healthz's `imap` check."""
    check = health.imap_check([poller], WebSettings(), started=time.time(), now=time.time())
    return check.detail["accounts"][poller.settings.name]


class TestStartTls:
    def _harness(self, tmp_path: Path, server: Dovecot) -> Harness:
        return Harness(tmp_path, server)

    def test_trusted_ca(
        self, tmp_path: Path, dovecot_tls: Dovecot, ca: trustme.CA, monkeypatch
    ) -> None:
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        h = self._harness(tmp_path, dovecot_tls)
        try:
            dovecot_tls.append(desk_mail("over starttls"))
            h.poller(security="starttls")
            h.wait_count(1)
        finally:
            h.close()
        logins = [
            line for line in dovecot_tls.output().splitlines() if f"Login: user=<{USER}>" in line
        ]
        assert any(", TLS," in line for line in logins)

    def test_self_signed_refused_unless_tls_verify_false(
        self, tmp_path: Path, dovecot_tls: Dovecot
    ) -> None:
        h = self._harness(tmp_path, dovecot_tls)
        try:
            dovecot_tls.append(desk_mail("self-signed"))
            strict = h.poller(security="starttls")
            wait_until(lambda: "certificate verify failed" in strict.state)
            strict.stop()
            h.poller(name="lenient", security="starttls", tls_verify=False)
            h.wait_count(1)
        finally:
            h.close()


def test_run_once(tmp_path: Path, dovecot: Dovecot) -> None:
    dovecot.append(desk_mail("cron one"))
    dovecot.append(desk_mail("cron two"))
    store = open_store(tmp_path / "db.sqlite3")
    try:
        settings = account_for(dovecot, after="delete")
        first = imap.run_once(settings, store)
        second = imap.run_once(settings, store)
    finally:
        store.close()
    assert (first.accepted, second.accepted) == (2, 0)
    assert folder_state(dovecot) == {}


def test_folder_sync_filters_the_uid_star_quirk(tmp_path: Path, dovecot: Dovecot) -> None:
    dovecot.append(desk_mail("only one"))
    store = open_store(tmp_path / "db.sqlite3")
    settings = account_for(dovecot)
    client = imap.connect(settings)
    try:
        sync = FolderSync(settings, store, store.accept)
        sync.open(client)
        assert sync.run(client).accepted == 1
        assert client.search(["UID", "2:*"]) == [1]  # the quirk: the highest UID always matches
        assert sync.new_uids(client) == []
    finally:
        imap.close(client)
        store.close()


# -- the whole path: Dovecot -> gateway serve -> PagerDuty stand-in ----------------------------


def _imap_table(server: Dovecot, **overrides: Any) -> str:
    values: dict[str, Any] = {
        "name": "desk",
        "host": server.host,
        "port": server.port,
        "security": "none",
        "username": USER,
        "password": "${TEST_IMAP_PASSWORD}",
        "service": "helpdesk",
        "after": "seen",
        "idle": True,
        "poll_seconds": 0.3,
    }
    lines = [f"{k} = {_toml(v)}" for k, v in (values | overrides).items()]
    return "[[imap]]\n" + "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else f'"{value}"'


@pytest.fixture
def serve(tmp_path: Path, pd, dovecot: Dovecot, monkeypatch) -> Iterator[Any]:
    """Factory: start `gateway serve` with one [[imap]] account; killed at teardown."""
    monkeypatch.setenv("TEST_IMAP_PASSWORD", PASSWORD)
    processes: list[GatewayProcess] = []

    def start(**overrides: Any) -> GatewayProcess:
        port = free_port()
        config = write_config(
            tmp_path, pd_url=pd.url, smtp_port=port, extra=_imap_table(dovecot, **overrides)
        )
        process = GatewayProcess(config, port).start()
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


def _logged(process: GatewayProcess, text: str, timeout: float = 10.0) -> None:
    wait_until(
        lambda: text in process.output(),
        timeout,
        message=f"{text!r} not logged:\n{process.output()}",
    )


@pytest.mark.parametrize("idle", [pytest.param(True, id="idle"), pytest.param(False, id="polling")])
def test_serve_append_triggers_and_resolves(serve, pd, dovecot: Dovecot, idle: bool) -> None:
    gateway = serve(idle=idle)
    _logged(gateway, "imap desk: idle" if idle else "imap desk: polling")
    dovecot.append(desk_mail("Printer on fire", "New"))
    events = pd.wait_for(1)
    assert (events[0]["event_action"], events[0]["dedup_key"]) == ("trigger", "Printer on fire")
    dovecot.append(desk_mail("Printer on fire", "Resolved"))
    events = pd.wait_for(2)
    assert (events[1]["event_action"], events[1]["dedup_key"]) == ("resolve", "Printer on fire")
    assert gateway.stop() == 0


def test_serve_restart_with_mail_arriving_while_down(serve, pd, dovecot: Dovecot) -> None:
    dovecot.append(desk_mail("Case A", "New"))  # already waiting before the first start
    gateway = serve()
    pd.wait_for(1)
    assert gateway.stop() == 0
    dovecot.append(desk_mail("Case B", "New"))
    dovecot.append(desk_mail("Case A", "Resolved"))
    serve()
    pd.wait_for(3)
    dovecot.append(desk_mail("Case C", "New"))  # sync point: all earlier mail is processed
    events = pd.wait_for(4)
    actions = sorted((e["event_action"], e["dedup_key"]) for e in events)
    assert actions == [
        ("resolve", "Case A"),
        ("trigger", "Case A"),
        ("trigger", "Case B"),
        ("trigger", "Case C"),
    ]
    assert len(pd.events) == 4


def test_serve_reconnects_after_imap_worker_killed_mid_idle(serve, pd, dovecot: Dovecot) -> None:
    gateway = serve()
    _logged(gateway, "imap desk: idle")
    wait_until(dovecot.imap_worker_pids)
    dovecot.kill_imap_workers()
    dovecot.append(desk_mail("Delivered after reconnect", "New"))
    assert pd.wait_for(1, timeout=20)[0]["dedup_key"] == "Delivered after reconnect"
    _logged(gateway, "connected again after 1 failure(s)")


def test_cli_imap_once(tmp_path: Path, pd, dovecot: Dovecot) -> None:
    config = write_config(tmp_path, pd_url=pd.url, extra=_imap_table(dovecot, password=PASSWORD))
    dovecot.append(desk_mail("From cron", "New"))

    def imap_once() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "imap-once", "desk"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ), check=False,
        )  # fmt: skip

    first = imap_once()
    assert first.returncode == 0, first.stderr
    assert "desk: accepted 1 message(s)" in first.stdout
    assert pd.wait_for(1)[0]["dedup_key"] == "From cron"
    second = imap_once()
    assert "desk: accepted 0 message(s)" in second.stdout
    assert len(pd.events) == 1


def test_cli_imap_once_wrong_password_exits_non_zero(tmp_path: Path, dovecot: Dovecot) -> None:
    config = write_config(tmp_path, extra=_imap_table(dovecot, password="wrong"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "imap-once", "desk"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "authentication failed" in result.stderr
