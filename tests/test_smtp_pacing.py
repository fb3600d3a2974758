"""SMTP intake pacing (`[smtp] in_flow_backlog`, `in_flow_delay_seconds`): a new transaction
waits while too many accepted mails wait for a decision; nothing is ever refused.

The unit tests script the backlog the store reports; the last test runs the real listener on
loopback over a real spool (SQLite) with no worker, so nothing is decided until the test does."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.intake import flow
from gateway.intake.flow import IntakePacing
from gateway.intake.spool import SpoolWriter
from gateway.store import JobDecision, open_store
from tests.conftest import desk_mail
from tests.test_smtp import S250_OK, Wire, listening, port_of, run, settings


class ScriptedBacklog:
    """The store's answers, in order (the last one repeats); counts the questions."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.asked = 0

    async def __call__(self) -> int:
        self.asked += 1
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_under_the_limit_the_store_is_asked_once_per_limit_mails() -> None:
    """Mails accepted since the last question count as waiting (an upper bound), so at a steady
    rate the store is asked only when that bound passes the limit."""

    async def scenario() -> None:
        backlog = ScriptedBacklog(0)
        pacing = IntakePacing(backlog, backlog=10, max_delay=1.0)
        for _ in range(10):
            assert await pacing.admit() == 0.0
            pacing.accepted()
        assert backlog.asked == 1  # the first admit; 10 accepted since, not over 10
        await asyncio.sleep(flow.POLL_SECONDS)
        pacing.accepted()  # 11 > 10: ask again, and the store says 0 wait
        assert await pacing.admit() == 0.0
        assert backlog.asked == 2
        assert pacing.counts.paced == 0

    run(scenario)


def test_over_the_limit_a_transaction_waits_until_decisions_catch_up() -> None:
    async def scenario() -> None:
        backlog = ScriptedBacklog(30, 25, 12, 10, 0)
        pacing = IntakePacing(backlog, backlog=10, max_delay=30.0)
        assert await pacing.admit() > 0.0
        assert backlog.asked == 4  # released by the first answer at the limit
        assert (pacing.counts.paced, pacing.counts.timed_out) == (1, 0)

    run(scenario)


def test_waiting_sessions_share_one_question() -> None:
    async def scenario() -> None:
        backlog = ScriptedBacklog(*[50] * 5, 0)
        pacing = IntakePacing(backlog, backlog=10, max_delay=30.0)
        waits = await asyncio.gather(*(pacing.admit() for _ in range(8)))
        assert all(w > 0 for w in waits)
        assert pacing.counts.paced == 8
        assert backlog.asked <= 12  # not 8 sessions x 6 questions

    run(scenario)


def test_a_decider_that_makes_no_progress_is_asked_about_rarely() -> None:
    """Each question is a round trip (PostgreSQL, several nodes asking): with nothing decided,
    the questions slow down to one per MAX_POLL_SECONDS, not one per POLL_SECONDS."""

    async def scenario() -> None:
        backlog = ScriptedBacklog(500)
        pacing = IntakePacing(backlog, backlog=10, max_delay=0.3)
        await pacing.admit()
        assert pacing.counts.timed_out == 1
        assert backlog.asked <= 1 + round(0.3 / flow.MAX_POLL_SECONDS) + 1  # not 0.3 / 0.005

    run(scenario)


def test_a_stalled_worker_costs_one_delay_then_pacing_pauses_until_the_backlog_falls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(flow, "MAX_AGE_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="gateway.intake.flow")

    async def scenario() -> None:
        backlog = ScriptedBacklog(500)
        pacing = IntakePacing(backlog, backlog=10, max_delay=0.05)
        assert await pacing.admit() >= 0.05  # the one delay, then pacing pauses
        assert pacing.counts.timed_out == 1
        assert "nothing was decided for 0.05 s while 500 mails waited (is the worker running?)" in (
            caplog.text
        )
        assert [await pacing.admit() for _ in range(20)] == [0.0] * 20
        backlog.answers = [0]  # the worker is back and has caught up
        await asyncio.sleep(flow.MAX_AGE_SECONDS)
        assert await pacing.admit() == 0.0  # asked again: under the limit, pacing resumes
        backlog.answers = [500]
        await asyncio.sleep(flow.POLL_SECONDS)
        for _ in range(11):
            pacing.accepted()
        assert await pacing.admit() > 0.0
        assert (pacing.counts.paced, pacing.counts.timed_out) == (2, 2)

    run(scenario)


def test_a_backlog_bigger_than_a_delay_of_work_is_not_called_a_stalled_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After an outage the worker decides, just not fast enough to bring 5,000 mails under the
    limit within one delay: the warning says so, and does not blame the worker."""
    caplog.set_level(logging.WARNING, logger="gateway.intake.flow")

    async def scenario() -> None:
        backlog = ScriptedBacklog(*range(5000, 4000, -7))
        pacing = IntakePacing(backlog, backlog=10, max_delay=0.1)
        await pacing.admit()
        assert pacing.counts.timed_out == 1

    run(scenario)
    assert "mails wait for a decision, more than 0.1 s of work at the current rate" in caplog.text
    assert "worker running" not in caplog.text


def test_an_unknown_backlog_never_holds_mail_back() -> None:
    async def scenario() -> None:
        failing = ScriptedBacklog(StoreError("database is locked"))
        pacing = IntakePacing(failing, backlog=1, max_delay=5)
        assert await pacing.admit() == 0.0
        assert pacing.counts.paced == 0

    run(scenario)


@pytest.mark.parametrize(("backlog", "delay"), [(0, 1.0), (10, 0.0)])
def test_zero_turns_pacing_off(backlog: int, delay: float) -> None:
    async def scenario() -> None:
        store = ScriptedBacklog(10**6)
        pacing = IntakePacing(store, backlog=backlog, max_delay=delay)
        assert not pacing.enabled
        assert await pacing.admit() == 0.0
        assert store.asked == 0

    run(scenario)


def test_the_real_listener_paces_on_the_spool_backlog_and_still_accepts_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker runs: with three mails undecided (over the limit of two) the fourth MAIL waits
    its delay, is answered 250 all the same, and pacing pauses; once the backlog is decided
    (here, by the test) pacing resumes."""
    monkeypatch.setattr(flow, "MAX_AGE_SECONDS", 0.05)
    db = tmp_path / "gateway.sqlite3"
    spool = SpoolWriter(db)
    spool.start()

    async def scenario() -> None:
        smtp = settings(in_flow_backlog=2, in_flow_delay_seconds=0.2)
        async with listening(smtp, spool) as listener:  # type: ignore[arg-type]
            wire, _ = await Wire.open(port_of(listener))
            await wire.cmd("EHLO client.example")
            for n in range(5):
                reply = await wire.send_mail(desk_mail(f"Case {n}"))
                assert reply.code == S250_OK, reply
            assert listener.pacing.counts.paced == 1  # the fourth; the fifth: paused
            assert listener.pacing.counts.timed_out == 1
            store = open_store(db)
            for job in store.pending_jobs():
                with store.transaction():
                    store.finish_job(
                        JobDecision(job.id, outcome="unmatched", reason="decided by the test")
                    )
            store.close()
            await asyncio.sleep(flow.MAX_AGE_SECONDS)
            assert (await wire.send_mail(desk_mail("Case 5"))).code == S250_OK
            assert (await wire.send_mail(desk_mail("Case 6"))).code == S250_OK
            assert listener.pacing.counts.timed_out == 1
            assert listener.pacing.counts.paced == 1  # resumed, and 1 + 1 undecided <= 2
            await wire.close()

    try:
        run(scenario)
    finally:
        spool.stop()
    assert open_store(db).undecided_jobs() == 2
