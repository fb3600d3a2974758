"""The worker process of `gateway serve`: decisions (processor) and deliveries (outboxes).

The parent process only accepts mail (SMTP, IMAP) into the spool and serves the web listener.
Everything after acceptance runs here, in a child process started with `spawn`:

* parsing, rules and HTTP calls are CPU work; in their own process they use the second core
  instead of competing with the SMTP listener for the GIL;
* the child runs at the listener's CPU priority: paging is what the gateway is for, and a
  niced worker on a busy host fell seconds behind (see WORKER_NICENESS); the listener needs
  the CPU only in short bursts, and each of its commits is group-committed anyway;
* a crash here cannot take the listener down: the supervisor restarts the child, and pending
  jobs and outbox items simply wait in the store;
* its commits skip the fsync (``synchronous=NORMAL``): the device's fsync queue belongs to the
  acceptance commits that SMTP clients are waiting on. A process crash loses nothing (the WAL
  is in the OS); a power cut may roll back the last decisions and delivery results, atomically
  and in order, so they are redone: decided again, and sent again at least once, which
  PagerDuty folds into the same incident by its dedup_key. Every later acceptance commit
  (FULL) makes all earlier ones durable too.

The parent talks to the child over two pipes. On the message pipe, the first message is the
last good configuration generation (`GenerationFiles`: the bytes the parent validated), later
ones are a new generation after each accepted reload, "outbox" (items re-queued) and "stop"
(finish the batch and the deliveries in flight, then exit). The child compiles
generations from those bytes and never reads config, rules or themes from disk, so it cannot
run a file the parent refused, not even after a crash and restart. The database path is the
parent's, fixed for the life of `serve`, whatever a later generation says about data_dir.

One thread in the parent writes to the message pipe, fed by a queue: a big generation never
blocks the event loop while the child is still starting up.

The wake pipe carries one byte per spool commit, written by the spool writer's thread itself
(non-blocking: a full pipe already holds wakes the child has not read). No thread hop, no
pickling, and a wake never waits behind a generation; the child reads every byte waiting at
once, so a burst of commits is one wake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from gateway.decide.notifications import build_helpdesk_notifier
from gateway.decide.processor import Processor, build_processor
from gateway.delivery.dispatch import Deliveries, pagerduty_transport
from gateway.errors import ProblemsError, StoreError
from gateway.logs import LEVELS, setup_logging
from gateway.node import set_node, this_node
from gateway.runtime.loop import run_event_loop
from gateway.runtime.reload import Generation, GenerationFiles, compile_generation
from gateway.store import Store, StoreThread, exclusive_turn, listen_for_work, open_store

log = logging.getLogger(__name__)

# Chosen by end-to-end latency under load, not by intake alone (bench/RESULTS.md, issue 12
# "perf2"): with other work on the box, a worker at 19 (or 10) got so small a CPU share that at
# 500 msg/s end of DATA -> POST reached p50 0.7-1.1 s, p99 1.1-2.0 s, and a burst was delivered
# at 0.41-0.63x intake; at 0 the same runs kept p50 15-18 ms, p99 143-223 ms and 0.67-0.68x,
# with no measurable cost to intake. 0: the parent's priority, the call is skipped.
WORKER_NICENESS = 0

# The decider thread runs flat out in a burst while the event loop thread (deliveries) waits for
# the GIL after every wake-up, by default up to 5 ms each time: deliveries then fell behind
# decisions by hundreds of items. At 0.5 ms a burst of 3,000 mails was delivered at 1,590-1,600
# instead of 1,490-1,510 mails/s, with no change in CPU per mail (bench/RESULTS.md, third pass).
GIL_SWITCH_SECONDS = 0.0005

# batches of `Processor.process_pending` per trip to the decider thread
BATCHES_PER_HOP = 5
# PostgreSQL: a decider that asks nothing of the store this long (frozen, hung) loses the
# "decide" turn to another node; a live one asks at least every second (`_decide_backlog`)
DECIDE_TURN_SILENCE = 15.0
# PostgreSQL: a standby node asks for the "decide" turn at most this often, not at every
# wake-up (each ask is a round trip, and every commit on any node wakes every worker): the
# holder decides every node's mail, and a dead holder's lock is free as soon as its session
# ends; a standby asks about once a second (the safety-net wake), so it takes over that soon
TURN_RETRY_SECONDS = 0.9
# PostgreSQL: the node holding the decide turn asks this often whether other nodes' workers are
# up and delivering; while one is, it leaves them the new outbox items
# (`Deliveries.leave_new_items`)
ASK_OTHER_NODES_SECONDS = 1.0

# Mail arriving steadily is decided at most once per this many seconds, so each trip to the
# decider (and the delivery round it wakes) takes the mails of the window together, as
# PostgreSQL's commit_delay gathers commits. A mail after a quiet spell is decided at once: the
# window only costs latency (at most this much) while mail keeps coming. At a steady 100
# msg/s it took the worker from 2.2-2.3 to 1.6-1.9 ms CPU per mail (bench/RESULTS.md, fourth
# pass); 30-45 ms saved a little more, but put the p99 at 35-50 ms, near the 50 ms goal.
GATHER_SECONDS = 0.02

Message = str | GenerationFiles  # "outbox" | "stop" | a generation (and "wake" in tests)
_CLOSE = "close"  # not sent: tells the pipe writer to close a replaced pipe


@dataclass
class GatherWindow:
    """When the next trip to the decider may start: at once after a quiet spell, else one
    window after the last trip started (the mails of the window are decided together)."""

    seconds: float
    last: float = -math.inf  # when the last trip started (monotonic)

    def wait(self, now: float) -> float:
        """Seconds to wait before deciding (0: decide now)."""
        return max(0.0, self.last + self.seconds - now)

    def opened(self, now: float) -> None:
        self.last = now


class WorkerProcess:
    """The parent's handle on the worker child: start, wake, configure, supervise, stop."""

    def __init__(self, db_path: str | Path, generation: GenerationFiles) -> None:
        self.db_path = db_path
        self.generation = generation  # the last good one: what a (re)started child gets first
        self._context = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None
        self._outgoing: queue.SimpleQueue[tuple[Connection, Message] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="worker-pipe", daemon=True)
        self._wakes: Connection | None = None  # the parent's end of the wake pipe
        self._wakes_lock = threading.Lock()  # never write to a descriptor closed meanwhile
        self._stopping = False
        self.restarts = 0

    def start(self) -> None:
        child_end, parent_end = self._context.Pipe(duplex=False)
        wakes_child, wakes_parent = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(str(self.db_path), child_end, wakes_child),
            name="gateway-worker",
        )
        process.start()
        child_end.close()
        wakes_child.close()
        old, self._process, self._pipe = self._pipe, process, parent_end
        if old is not None:
            self._outgoing.put((old, _CLOSE))
        self._outgoing.put((parent_end, self.generation))
        if not self._writer.is_alive():
            self._writer.start()
        os.set_blocking(wakes_parent.fileno(), False)
        self._replace_wakes(wakes_parent)
        self.wake()  # resume whatever a previous run left pending

    def _replace_wakes(self, wakes: Connection | None) -> None:
        with self._wakes_lock:
            old, self._wakes = self._wakes, wakes
            if old is not None:
                old.close()

    def wake(self) -> None:
        """Thread-safe; the spool writer calls it after every commit: one byte, no hop."""
        with self._wakes_lock:
            wakes = self._wakes
            if wakes is None:
                return
            # full (the child has wakes unread) or broken (the supervisor restarts the child)
            with contextlib.suppress(OSError):
                os.write(wakes.fileno(), b"w")

    def wake_outbox(self) -> None:
        self._post("outbox")

    def configure(self, generation: GenerationFiles) -> None:
        """An accepted reload: the child switches to `generation`, and so will a restarted one."""
        self.generation = generation
        self._post(generation)

    def _post(self, message: Message) -> bool:
        pipe = self._pipe
        if pipe is None:
            return False
        self._outgoing.put((pipe, message))
        return True

    def _write(self) -> None:
        """The pipe writer thread: sends in order, never blocking the callers."""
        while (entry := self._outgoing.get()) is not None:
            pipe, message = entry
            if message == _CLOSE:
                pipe.close()
                continue
            # a dead child is restarted by the supervisor and gets the generation again
            with contextlib.suppress(OSError):
                pipe.send(message)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart the child if it dies (pausing longer after repeated crashes)."""
        while not stop.is_set():
            process = self._process
            if process is not None and not process.is_alive() and not self._stopping:
                log.error(
                    "worker process exited with %s; restarting with generation %d",
                    process.exitcode,
                    self.generation.number,
                )
                self.restarts += 1
                self.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 if self.restarts < 5 else 5.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Blocking: let the child finish its batch and deliveries in flight, then exit."""
        self._stopping = True
        self._post("stop")
        process = self._process
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                log.error("worker did not stop within %.0fs; killing it", timeout)
                process.kill()
                process.join(5)
        self._outgoing.put(None)
        if self._writer.is_alive():
            self._writer.join(5)
        self._replace_wakes(None)


def _worker_main(db_path: str, inbox: Connection, wakes: Connection) -> None:
    """Child process entry point."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads arrive over the pipe
    if WORKER_NICENESS:
        with contextlib.suppress(OSError):
            os.nice(WORKER_NICENESS)
    try:
        shipped = inbox.recv()  # the parent sends the last good generation first
    except EOFError:
        return  # the parent is gone already
    if not isinstance(shipped, GenerationFiles):
        raise SystemExit(f"worker: expected a configuration generation first, got {shipped!r}")
    try:
        generation = compile_generation(shipped)
    except ProblemsError as exc:  # the parent validated these bytes: only the environment differs
        raise SystemExit(f"worker: generation {shipped.number} does not compile:\n{exc}") from None
    config = generation.config
    setup_logging(config.gateway.log_level, config.gateway.log_format)
    set_node(config.store.node)
    run_event_loop(_Worker(_location(db_path), generation, inbox, wakes).run())


class _Worker:
    """Inside the child: one thread decides jobs, the event loop delivers outbox items."""

    def __init__(
        self,
        db_path: str | Path,
        generation: Generation,
        inbox: Connection,
        wakes: Connection | None = None,
    ) -> None:
        self.db_path = db_path
        self.generation = generation
        self.inbox = inbox
        self.wakes = wakes  # the wake pipe: one byte per spool commit, read without blocking
        if wakes is not None:
            os.set_blocking(wakes.fileno(), False)
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.deliveries: Deliveries | None = None
        self._switches: set[asyncio.Task[None]] = set()
        # the processor's store lives on this one thread, like every SQLite connection
        self.decider = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="processor")
        self.processor: Processor | None = None
        self.decisions: Store | None = None  # the processor's connection, owned by `decider`
        # nodes sharing a PostgreSQL store decide one at a time, in acceptance order (None: SQLite)
        self.decide_turn = exclusive_turn(db_path, "decide", silence=DECIDE_TURN_SILENCE)
        self._turn_refused_at: float | None = None  # when another node last held it
        self.gather = GatherWindow(GATHER_SECONDS)
        self._others_delivering = False  # another node's worker was up and sending, last asked
        self._others_asked = -ASK_OTHER_NODES_SECONDS

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.processor = await loop.run_in_executor(self.decider, self._new_processor)
        config = self.generation.config
        log.info("worker running generation %d", self.generation.number)
        store = StoreThread(self.db_path, "outbox", durable=False)
        # other nodes' commits (PostgreSQL); the timers below remain the polling fallback
        wakeups = listen_for_work(
            self.db_path,
            on_jobs=lambda: loop.call_soon_threadsafe(self.wake.set),
            on_outbox=self._wake_outboxes_threadsafe,
            node=this_node(),
        )
        async with pagerduty_transport(config) as transport:
            self.deliveries = Deliveries(store, transport, config)
            loop.add_reader(self.inbox.fileno(), self._on_message)
            if self.wakes is not None:
                loop.add_reader(self.wakes.fileno(), self._on_wakes)
            delivering = asyncio.create_task(self.deliveries.run(self.stop))
            if wakeups is not None:
                wakeups.start()
            await self._decide_until_stopped()
            await delivering
            loop.remove_reader(self.inbox.fileno())
            if self.wakes is not None:
                loop.remove_reader(self.wakes.fileno())
        if wakeups is not None:
            wakeups.stop()
        store.close()
        if self.decisions is not None:
            await loop.run_in_executor(self.decider, self.decisions.close)
        if self.decide_turn is not None:
            await loop.run_in_executor(self.decider, self.decide_turn.release)
        self.decider.shutdown()

    def _new_processor(self) -> Processor:
        generation, config = self.generation, self.generation.config
        self.decisions = open_store(self.db_path, durable=False)
        return build_processor(
            config,
            self.decisions,
            generation.services,
            on_outbox=self._wake_outboxes_threadsafe,
            files=generation.files,
        )

    def _wake_outboxes_threadsafe(self) -> None:
        if self.deliveries is not None:
            self.deliveries.wake()  # Dispatcher.wake is thread-safe

    async def _decide_until_stopped(self) -> None:
        """Decide pending jobs whenever woken (and every second, as a safety net), mail that
        keeps coming in windows of `GATHER_SECONDS`."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.wake.wait()
            if (gathering := self.gather.wait(time.monotonic())) > 0 and not self.stop.is_set():
                await asyncio.sleep(gathering)
            self.wake.clear()
            self.gather.opened(time.monotonic())
            if not self._standing_by():
                await self._decide_all(loop)
            if self.stop.is_set():
                return

    async def _decide_all(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not await loop.run_in_executor(self.decider, self._decide_backlog):
                pass
        except StoreError as exc:  # the database is away: the jobs stay pending
            log.warning("deciding paused, store unavailable; will retry: %s", exc)
        except Exception:  # anything else is a bug: its trace is for the developers
            log.exception("processing failed; will retry")

    def _standing_by(self) -> bool:
        """Another node held the decide turn less than `TURN_RETRY_SECONDS` ago."""
        refused = self._turn_refused_at
        return refused is not None and time.monotonic() - refused < TURN_RETRY_SECONDS

    def _decide_backlog(self) -> bool:
        """On the decider thread: batches until none is pending (True), or until
        `BATCHES_PER_HOP` ran (False), so a reload or stop can run between them. One hop per
        wake; a wake that finds one mail costs one query for pending jobs."""
        processor = self.processor
        assert processor is not None
        if self.decide_turn is not None:
            if not self.decide_turn.acquire():
                self._turn_refused_at = time.monotonic()
                self._share_deliveries(deciding=False)
                return True  # another node decides; this one takes over if it dies
            self._turn_refused_at = None
            self._share_deliveries(deciding=True)
        try:
            processor.check_heartbeats()  # expected mail overdue? (looks at most once a second)
        except StoreError as exc:  # the database is away; deciding below says so too
            log.warning("heartbeat check paused, store unavailable: %s", exc)
        except Exception:  # never in the way of deciding mail; tried again next time
            log.exception("heartbeat check failed; will retry")
        return processor.process_backlog(BATCHES_PER_HOP)

    def _share_deliveries(self, *, deciding: bool) -> None:
        """On the decider thread. The node deciding every node's mail is the cluster's
        busiest: while another node's worker is up and its deliveries go through, that node
        delivers the new items and this one only what waited (`Dispatcher.leave_new_items`).
        Asked at most once a second."""
        others = False
        if deciding and self.decide_turn is not None:
            now = time.monotonic()
            if now - self._others_asked >= ASK_OTHER_NODES_SECONDS:
                self._others_delivering = self.decide_turn.others_delivering(this_node())
                self._others_asked = now
            others = self._others_delivering
        if self.deliveries is not None:
            self.deliveries.leave_new_items(others)

    def _on_wakes(self) -> None:
        """The wake pipe is readable: every commit signalled so far is one wake."""
        assert self.wakes is not None
        try:
            signalled = os.read(self.wakes.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            signalled = b""
        if signalled:
            self.wake.set()
        else:  # the parent is gone: the message pipe says so too, and stops the child
            asyncio.get_running_loop().remove_reader(self.wakes.fileno())

    def _on_message(self) -> None:
        """The pipe is readable: take one message; the loop calls again while more wait.

        (`Connection.poll()` would build a selector on every call: it cost more than the
        message it found.)"""
        try:
            message = self.inbox.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.inbox.fileno())
            self._handle("stop")  # the parent is gone
            return
        self._handle(message)

    def _handle(self, message: Message) -> None:
        if isinstance(message, GenerationFiles):
            # queued on the decider now, ahead of the batch any later "wake" asks for
            swapped = asyncio.get_running_loop().run_in_executor(
                self.decider, self._swap_processor, message
            )
            task = asyncio.get_running_loop().create_task(self._switch(swapped))
            self._switches.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._switches.discard)
        elif message == "wake":
            self.wake.set()
        elif message == "outbox":
            self._wake_outboxes_threadsafe()
        elif message == "stop":
            self.stop.set()
            self.wake.set()

    async def _switch(self, swapped: asyncio.Future[Generation | None]) -> None:
        """Once the processor swapped (on its thread, between batches): the senders."""
        generation = await swapped
        if generation is None:
            return
        if self.deliveries is not None:
            self.deliveries.reconfigure(generation.config)
        level = generation.config.gateway.log_level
        logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
        log.info("worker running generation %d", generation.number)

    def _swap_processor(self, shipped: GenerationFiles) -> Generation | None:
        assert self.processor is not None
        try:
            generation = compile_generation(shipped)
            config = generation.config
            notifier = build_helpdesk_notifier(config, files=generation.files)
        except ProblemsError as exc:  # cannot happen with the parent's validated bytes
            log.error(
                "worker: generation %d refused, keeping the last good:\n%s", shipped.number, exc
            )
            return None
        self.processor.reconfigure(
            generation.services,
            config.pagerduty,
            regex_timeout=config.gateway.regex_timeout_seconds,
            notifier=notifier,
            maintenance=config.maintenance,
            heartbeats=config.heartbeats,
            installation_id=config.gateway.installation_id,
        )
        self.generation = generation
        return generation


def _location(text: str) -> str | Path:
    """The store location passed to the worker as text: a URL stays a URL (Path would fold
    its `//`), a file path becomes a Path again."""
    return text if "://" in text else Path(text)
