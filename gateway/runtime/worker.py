"""The worker process of `gateway serve`: decisions (processor) and deliveries (outboxes).

The parent process only accepts mail (SMTP, IMAP) into the spool and serves the web listener.
Everything after acceptance runs here, in a child process started with `spawn`:

* parsing, rules and HTTP calls are CPU work; in their own process they use the second core
  instead of competing with the SMTP listener for the GIL;
* the child runs at the lowest CPU priority, so under a burst the durable acceptance of mail
  comes first and processing catches up from the spool right after;
* a crash here cannot take the listener down: the supervisor restarts the child, and pending
  jobs and outbox items simply wait in the store;
* its commits skip the fsync (``synchronous=NORMAL``): the device's fsync queue belongs to the
  acceptance commits that SMTP clients are waiting on. A process crash loses nothing (the WAL
  is in the OS); a power cut may roll back the last decisions and delivery results, atomically
  and in order, so they are redone: decided again, and sent again at least once, which
  PagerDuty folds into the same incident by its dedup_key. Every later acceptance commit
  (FULL) makes all earlier ones durable too.

The parent talks to the child over a pipe: "wake" (a spool commit), "outbox" (items re-queued),
"reload" (config and rules changed; the child validates again and keeps the last good on error)
and "stop" (finish the batch and the deliveries in flight, then exit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import httpx

from gateway.config import Config, load_config
from gateway.decide.notifications import build_helpdesk_notifier
from gateway.decide.processor import Processor, load_services
from gateway.delivery import dispatch as delivery
from gateway.delivery.outbox import Dispatcher
from gateway.errors import ConfigError, RuleError, ThemeError
from gateway.logs import setup_logging
from gateway.runtime.reload import load_generation
from gateway.store import StoreThread, open_store

log = logging.getLogger(__name__)

# Acceptance first, processing right after. Under Linux CFS a niced process is never starved,
# only weighted: even beside a busy nice-0 process on one core it keeps a share that decides a
# normal mail within tens of milliseconds; on the usual dedicated host it only yields to the
# listener during bursts (bench/RESULTS.md: ratio 0.79-0.83 at 19, 0.75-0.81 at 10).
WORKER_NICENESS = 19


class WorkerProcess:
    """The parent's handle on the worker child: start, wake, reload, supervise, stop."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._context = multiprocessing.get_context("spawn")  # never fork a threaded process
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.restarts = 0

    def start(self) -> None:
        child_end, parent_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main, args=(str(self.config_path), child_end), name="gateway-worker"
        )
        process.start()
        child_end.close()
        with self._lock:
            self._process, self._pipe = process, parent_end
        self.wake()  # resume whatever a previous run left pending

    def wake(self) -> None:
        """Thread-safe; the spool writer calls it after every commit."""
        self._send("wake")

    def wake_outbox(self) -> None:
        self._send("outbox")

    def reload(self) -> None:
        self._send("reload")

    def _send(self, message: str) -> None:
        with self._lock:
            if self._pipe is None:
                return
            # a dead child is restarted by the supervisor and rescans the store anyway
            with contextlib.suppress(OSError):
                self._pipe.send(message)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart the child if it dies (pausing longer after repeated crashes)."""
        while not stop.is_set():
            process = self._process
            if process is not None and not process.is_alive() and not self._stopping:
                log.error("worker process exited with %s; restarting", process.exitcode)
                self.restarts += 1
                self.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0 if self.restarts < 5 else 5.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Blocking: let the child finish its batch and deliveries in flight, then exit."""
        self._stopping = True
        self._send("stop")
        process = self._process
        if process is None:
            return
        process.join(timeout)
        if process.is_alive():
            log.error("worker did not stop within %.0fs; killing it", timeout)
            process.kill()
            process.join(5)


def _worker_main(config_path: str, inbox: Connection) -> None:
    """Child process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads arrive over the pipe
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    config = load_config(Path(config_path))
    setup_logging(config.gateway.log_level, config.gateway.log_format)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_Worker(Path(config_path), config, inbox).run())
    else:
        uvloop.run(_Worker(Path(config_path), config, inbox).run())


class _Worker:
    """Inside the child: one thread decides jobs, the event loop delivers outbox items."""

    def __init__(self, config_path: Path, config: Config, inbox: Connection) -> None:
        self.config_path = config_path
        self.config = config
        self.inbox = inbox
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.workers: list[Dispatcher] = []
        # the processor's store lives on this one thread, like every SQLite connection
        self.decider = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="processor")
        self.processor: Processor | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.processor = await loop.run_in_executor(self.decider, self._new_processor)
        store = StoreThread(self.config.db_path, "outbox", durable=False)
        async with httpx.AsyncClient(timeout=self.config.pagerduty.timeout_seconds) as client:
            self.workers = [delivery.pagerduty_dispatcher(store, client, self.config)]
            self.workers += filter(None, [delivery.mail_dispatcher(store, self.config)])
            loop.add_reader(self.inbox.fileno(), self._on_message)
            tasks = [asyncio.create_task(w.run(self.stop)) for w in self.workers]
            await self._decide_until_stopped()
            await asyncio.gather(*tasks)
            loop.remove_reader(self.inbox.fileno())
        store.close()
        await loop.run_in_executor(self.decider, self.processor.store.close)
        self.decider.shutdown()

    def _new_processor(self) -> Processor:
        config = self.config
        return Processor(
            open_store(config.db_path, durable=False),
            load_services(config.services),
            config.pagerduty,
            regex_timeout=config.gateway.regex_timeout_seconds,
            on_outbox=self._wake_outboxes_threadsafe,
            notifier=build_helpdesk_notifier(config),
        )

    def _wake_outboxes_threadsafe(self) -> None:
        for worker in self.workers:
            worker.wake()  # Dispatcher.wake is thread-safe

    async def _decide_until_stopped(self) -> None:
        """Decide pending jobs whenever woken (and every second, as a safety net)."""
        loop = asyncio.get_running_loop()
        assert self.processor is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)
            self.wake.clear()
            try:
                while await loop.run_in_executor(self.decider, self.processor.process_pending):
                    pass
            except Exception:  # store trouble: the jobs stay pending, try again shortly
                log.exception("processing failed; will retry")
            if self.stop.is_set():
                return

    def _on_message(self) -> None:
        try:
            while self.inbox.poll():
                self._handle(self.inbox.recv())
        except (EOFError, OSError):
            self._handle("stop")  # the parent is gone
            asyncio.get_running_loop().remove_reader(self.inbox.fileno())

    def _handle(self, message: str) -> None:
        if message == "wake":
            self.wake.set()
        elif message == "outbox":
            self._wake_outboxes_threadsafe()
        elif message == "reload":
            asyncio.get_running_loop().run_in_executor(self.decider, self._reload)
        elif message == "stop":
            self.stop.set()
            self.wake.set()

    def _reload(self) -> None:
        """On the processor thread, between batches; on any error keep the last good."""
        assert self.processor is not None
        try:
            validated = load_generation(self.config_path)  # what `gateway check` runs
            config, services = validated.config, validated.services
            notifier = build_helpdesk_notifier(config)
        except (ConfigError, RuleError, ThemeError) as exc:
            log.error("reload refused, keeping the last good rules:\n%s", exc)
            return
        self.processor.services, self.processor.notifier = services, notifier
        routing_keys = {s.name: s.routing_key for s in config.services if s.routing_key}
        for worker in self.workers:
            if hasattr(worker.send, "routing_keys"):
                worker.send.routing_keys = routing_keys
                worker.send.events_url = config.pagerduty.events_url
        log.info("rules reloaded: %s", ", ".join(services))
