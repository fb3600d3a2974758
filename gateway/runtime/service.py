"""`gateway serve`: wires the spool writer, the worker process and the listeners on one loop.

Shutdown order matters for "nothing acknowledged is lost": stop accepting new sessions, let the
sessions in flight finish (their 250 waits for the spool commit), stop the spool writer (it
commits what is queued), then stop processing and delivery. Whatever is left pending resumes on
the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace

from gateway.config import Config
from gateway.intake.imap import ImapPoller
from gateway.intake.smtp_listener import SmtpListener
from gateway.intake.spool import SpoolWriter
from gateway.node import set_node
from gateway.runtime.control import ControlPlane
from gateway.runtime.loop import run_event_loop
from gateway.runtime.parts import Runtime
from gateway.runtime.reload import load_generation
from gateway.runtime.worker import WorkerProcess
from gateway.store import verify_store
from gateway.store.sqlite import Checkpointer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0


def run(config: Config) -> int:
    """Blocking entry point."""
    return run_event_loop(Service(config).run())


class Service:
    """The running gateway; `stop()` (or SIGTERM/SIGINT) ends `run()` cleanly."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.runtime: Runtime | None = None
        self.control: ControlPlane | None = None  # notify, reload, web, retention

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> int:
        # what `gateway check` runs: fail with file:line before listening
        generation = replace(load_generation(self.config.path), number=1)
        config = generation.config
        set_node(config.store.node)
        verify_store(config.store_location)  # a damaged database is refused, never started over
        spool = SpoolWriter(config.store_location)
        runtime = self.runtime = Runtime(
            stopping=self.stopping,
            generation=generation,
            spool=spool,
            worker=WorkerProcess(config.store_location, generation.for_worker()),
            smtp=SmtpListener(config.smtp, config.services, spool),
            imap=[ImapPoller(account, spool, config.store_location) for account in config.imap],
        )
        spool.start()
        # WAL checkpoints are SQLite's; PostgreSQL checkpoints on its own
        checkpointer = Checkpointer(config.db_path) if config.store.url is None else None
        if checkpointer is not None:
            checkpointer.start()
        runtime.worker.start()
        spool.on_commit(runtime.worker.wake)
        tasks = [asyncio.create_task(runtime.worker.supervise(self.stopping), name="worker")]
        try:
            await runtime.smtp.start()
            for poller in runtime.imap:
                poller.start()
            self._install_signals()
            self.control = ControlPlane(runtime)
            await self.control.start()  # READY=1: the listeners are bound
            self.ready.set()
            log.info(
                "gateway ready: smtp %s, configuration generation %d",
                ", ".join(config.smtp.listen),
                generation.number,
            )
            await self.stopping.wait()
            log.info("shutting down: no new sessions, finishing those in flight")
        finally:
            await self._shutdown(runtime, tasks)
            if checkpointer is not None:
                checkpointer.stop()
        log.info("gateway stopped")
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    async def _shutdown(self, runtime: Runtime, tasks: list[asyncio.Task]) -> None:
        self.stopping.set()
        if self.control is not None:
            await self.control.close()  # STOPPING=1
        await runtime.smtp.close(SHUTDOWN_GRACE_SECONDS)  # also fine if it never listened
        await asyncio.gather(*(asyncio.to_thread(poller.stop) for poller in runtime.imap))
        await asyncio.to_thread(runtime.spool.stop)
        await asyncio.to_thread(runtime.worker.stop)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, SHUTDOWN_GRACE_SECONDS)
