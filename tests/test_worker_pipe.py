"""The pipe between parent and worker: wake-ups are coalesced under load, none is lost, and\nthe child spends as few thread switches on each as it can."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import smtplib
import threading
import time
from pathlib import Path

import pytest

from gateway.decide.processor import Processor
from gateway.runtime.reload import load_generation
from gateway.runtime.worker import (
    BATCHES_PER_HOP,
    GATHER_SECONDS,
    TURN_RETRY_SECONDS,
    GatherWindow,
    WorkerProcess,
    _Worker,
)
from tests.conftest import ROOT, GatewayProcess, desk_mail
from tests.ops_support import worker_pid
from tests.pdserver import PagerDutyStandIn


class GatedPipe:
    """Records what is sent; the first send blocks until the gate opens (a busy pipe)."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.gate = threading.Event()

    def send(self, message: object) -> None:
        if not self.sent:
            self.sent.append(message)
            self.gate.wait(10)
            return
        self.sent.append(message)


def test_a_commit_wakes_the_worker_while_a_generation_blocks_the_pipe(tmp_path: Path) -> None:
    """Wakes have their own pipe, written by the committing thread itself: none waits behind a
    big generation the child has not read yet, and 500 commits are one wake for the child."""
    generation = load_generation(ROOT / "config.toml")
    worker = WorkerProcess(tmp_path / "g.sqlite3", generation.for_worker())
    pipe = GatedPipe()
    worker._pipe = pipe  # type: ignore[assignment]
    wakes_child, wakes_parent = multiprocessing.Pipe(duplex=False)
    os.set_blocking(wakes_parent.fileno(), False)
    worker._replace_wakes(wakes_parent)
    child = _Worker(tmp_path / "g.sqlite3", generation, wakes_child, wakes_child)
    worker._writer.start()
    try:
        worker.configure(worker.generation)  # taken by the writer thread, blocked in send()
        deadline = time.monotonic() + 10
        while not pipe.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(500):  # 500 commits while the message pipe is busy
            worker.wake()
        assert wakes_child.poll(0)  # at once: no thread to wait for
        woken: list[bool] = []

        async def read_wakes() -> None:
            child._on_wakes()
            woken.append(child.wake.is_set())
            child.wake.clear()
            child._on_wakes()  # nothing left: the 500 were one wake
            woken.append(child.wake.is_set())
            worker.wake()  # and a later commit wakes again
            child._on_wakes()
            woken.append(child.wake.is_set())

        asyncio.run(read_wakes())
        assert woken == [True, False, True]
        assert len(pipe.sent) == 1  # the generation alone went over the message pipe
    finally:
        pipe.gate.set()
        worker._outgoing.put(None)
        worker._writer.join(5)
        worker._replace_wakes(None)
        child.decider.shutdown()


def test_wakes_to_a_gone_child_are_dropped_without_an_error(tmp_path: Path) -> None:
    worker = WorkerProcess(
        tmp_path / "g.sqlite3", load_generation(ROOT / "config.toml").for_worker()
    )
    worker.wake()  # not started: nothing to wake
    wakes_child, wakes_parent = multiprocessing.Pipe(duplex=False)
    os.set_blocking(wakes_parent.fileno(), False)
    worker._replace_wakes(wakes_parent)
    wakes_child.close()  # the child died
    for _ in range(100_000):  # a broken pipe, and never blocked by a full one
        worker.wake()
    worker._replace_wakes(None)
    worker.wake()


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The decider thread, counting the trips the event loop makes to it."""

    trips = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.trips += 1
        return super().submit(fn, *args, **kwargs)


class ScriptedProcessor:
    """Stands in for the Processor: `batches` non-empty batches, then nothing pending."""

    process_backlog = Processor.process_backlog  # the real loop over the scripted batches

    def __init__(self, batches: int, *, drained_after: int | None = None) -> None:
        self.left = batches
        self.calls = 0
        self.drained = False
        self.drained_after = drained_after  # from this call on, say the batch took every job

    def process_pending(self) -> list[int]:
        self.calls += 1
        self.drained = self.drained_after is not None and self.calls >= self.drained_after
        if self.left == 0:
            return []
        self.left -= 1
        return [self.calls]


def _decide_once(tmp_path: Path, processor: ScriptedProcessor) -> int:
    """One wake of the child's decide loop (then stop); returns the trips to the decider."""
    generation = load_generation(ROOT / "config.toml")
    child_end, _parent_end = multiprocessing.Pipe(duplex=False)
    worker = _Worker(tmp_path / "g.sqlite3", generation, child_end)
    worker.decider.shutdown()
    decider = worker.decider = CountingExecutor(1)
    worker.processor = processor  # type: ignore[assignment]

    async def one_wake() -> None:
        worker.wake.set()
        worker.stop.set()
        await worker._decide_until_stopped()

    try:
        asyncio.run(one_wake())
    finally:
        decider.shutdown()
    return decider.trips


def test_a_wake_takes_one_trip_to_the_decider_thread(tmp_path: Path) -> None:
    """The query that finds nothing left runs on the decider thread with the batch before it:
    at a steady rate every wake decides one mail, and each trip costs two thread switches."""
    processor = ScriptedProcessor(batches=1)
    assert _decide_once(tmp_path, processor) == 1
    assert processor.calls == 2


def test_a_wake_for_one_mail_looks_for_pending_jobs_once(tmp_path: Path) -> None:
    """A batch that took every pending job ends the round: at a steady rate each wake decides
    one mail, without a second query that only finds nothing left."""
    processor = ScriptedProcessor(batches=1, drained_after=1)
    assert _decide_once(tmp_path, processor) == 1
    assert processor.calls == 1


def test_a_backlog_returns_to_the_loop_between_rounds_of_batches(tmp_path: Path) -> None:
    """A reload or stop waits for at most BATCHES_PER_HOP batches, not for the whole backlog."""
    processor = ScriptedProcessor(batches=2 * BATCHES_PER_HOP + 2)
    assert _decide_once(tmp_path, processor) == 3
    assert processor.calls == 2 * BATCHES_PER_HOP + 3


def test_the_child_handles_every_message_queued_on_its_pipe(tmp_path: Path) -> None:
    """Several messages waiting at once are each handled (one per readable callback)."""
    generation = load_generation(ROOT / "config.toml")
    child_end, parent_end = multiprocessing.Pipe(duplex=False)
    worker = _Worker(tmp_path / "g.sqlite3", generation, child_end)
    handled: list[object] = []
    worker._handle = handled.append  # type: ignore[method-assign]

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(child_end.fileno(), worker._on_message)
        for message in ("wake", "outbox", "wake"):
            parent_end.send(message)
        parent_end.close()  # then the parent is gone: the child stops
        deadline = time.monotonic() + 10
        while "stop" not in handled and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    try:
        asyncio.run(receive())
    finally:
        worker.decider.shutdown()
    assert handled == ["wake", "outbox", "wake", "stop"]


def test_the_worker_pages_at_the_listeners_cpu_priority(
    gateway_process: GatewayProcess, pd: PagerDutyStandIn
) -> None:
    """A niced worker fell seconds behind on a busy host (issue 12, item 3): deciding and
    paging run at the same priority as accepting."""
    gateway_process.start()
    assert gateway_process.proc is not None
    with smtplib.SMTP("127.0.0.1", gateway_process.port, timeout=30) as client:
        client.sendmail(
            "support@helpdesk.example", ["desk@gw.example"], desk_mail("Printer on fire")
        )
    pd.wait_for(1)  # the worker is up and has paged: its priority is set by now
    pid = worker_pid(gateway_process.proc.pid)
    assert pid is not None
    parent = os.getpriority(os.PRIO_PROCESS, gateway_process.proc.pid)
    assert os.getpriority(os.PRIO_PROCESS, pid) == parent


class OtherNodesTurn:
    """The decide turn, held by another node all along; counts the asks."""

    def __init__(self) -> None:
        self.asks = 0

    def acquire(self) -> bool:
        self.asks += 1
        return False


def test_a_standby_node_asks_for_the_decide_turn_about_once_a_second_not_per_wake(
    tmp_path: Path,
) -> None:
    """Every commit on any node wakes every worker; while another node holds the turn, each
    ask would be a round trip and a trip to the decider thread for nothing."""
    generation = load_generation(ROOT / "config.toml")
    child_end, _parent_end = multiprocessing.Pipe(duplex=False)
    worker = _Worker(tmp_path / "g.sqlite3", generation, child_end)
    worker.decider.shutdown()
    decider = worker.decider = CountingExecutor(1)
    processor = ScriptedProcessor(batches=5)
    worker.processor = processor  # type: ignore[assignment]
    turn = worker.decide_turn = OtherNodesTurn()  # type: ignore[assignment]

    async def many_wakes() -> None:
        deciding = asyncio.create_task(worker._decide_until_stopped())
        for _ in range(50):  # 50 commits within a few milliseconds
            worker.wake.set()
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        worker.stop.set()
        worker.wake.set()
        async with asyncio.timeout(TURN_RETRY_SECONDS):  # stopping does not wait for a retry
            await deciding

    try:
        asyncio.run(many_wakes())
    finally:
        decider.shutdown()
    # one ask in the ~0.1 s this takes (two if the box stalls for TURN_RETRY_SECONDS); per wake
    # it was five (the 50 wakes fold into a few)
    assert turn.asks == decider.trips <= 2
    assert processor.calls == 0  # the holder decides; this node never did


def test_a_mail_after_a_quiet_spell_is_decided_at_once() -> None:
    """The gather window costs latency only while mail keeps coming: the first trip, and any
    trip a window or more after the last one started, waits for nothing."""
    window = GatherWindow(0.02)
    assert window.wait(now=100.0) == 0
    window.opened(100.0)
    assert window.wait(now=100.005) == pytest.approx(0.015)
    assert window.wait(now=100.02) == 0
    assert window.wait(now=130.0) == 0


def test_mail_that_keeps_coming_is_decided_once_per_window_not_per_wake(tmp_path: Path) -> None:
    """At a steady rate every commit wakes the worker; the wakes of one window take one trip to
    the decider (and one delivery round), not one each."""
    generation = load_generation(ROOT / "config.toml")
    child_end, _parent_end = multiprocessing.Pipe(duplex=False)
    worker = _Worker(tmp_path / "g.sqlite3", generation, child_end)
    worker.decider.shutdown()
    decider = worker.decider = CountingExecutor(1)
    worker.processor = ScriptedProcessor(batches=0)  # type: ignore[assignment]

    async def steady_wakes() -> float:
        deciding = asyncio.create_task(worker._decide_until_stopped())
        started = time.monotonic()
        while time.monotonic() - started < 10 * GATHER_SECONDS:  # a wake every millisecond
            worker.wake.set()
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - started
        worker.stop.set()
        worker.wake.set()
        await deciding
        return elapsed

    try:
        elapsed = asyncio.run(steady_wakes())
    finally:
        decider.shutdown()
    # one trip at once, then at most one per window (and the stop's); a slow box wakes less
    assert decider.trips <= elapsed / GATHER_SECONDS + 2
