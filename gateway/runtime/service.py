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

from gateway.config import Config
from gateway.intake.imap import ImapPoller
from gateway.intake.smtp import SmtpListener
from gateway.intake.spool import SpoolWriter
from gateway.runtime.operations import Operations
from gateway.runtime.reload import load_generation
from gateway.runtime.worker import WorkerProcess
from gateway.store.sqlite import Checkpointer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 30.0


def run(config: Config) -> int:
    """Blocking entry point; uses uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(Service(config).run())
    return uvloop.run(Service(config).run())


class Service:
    """The running gateway; `stop()` (or SIGTERM/SIGINT) ends `run()` cleanly."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.smtp: SmtpListener | None = None
        self.imap: list[ImapPoller] = []
        self.ops: Operations | None = None  # notify, reload, web, retention

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> int:
        config = self.config
        load_generation(
            config.path
        )  # what `gateway check` runs: fail with file:line before listening
        spool = SpoolWriter(config.db_path)
        spool.start()
        checkpointer = Checkpointer(config.db_path)
        checkpointer.start()
        worker = WorkerProcess(config.path)
        worker.start()
        spool.on_commit(worker.wake)
        tasks = [asyncio.create_task(worker.supervise(self.stopping), name="worker")]
        pollers = [ImapPoller(account, spool, config.db_path) for account in config.imap]
        try:
            self.smtp = SmtpListener(config.smtp, config.services, spool)
            await self.smtp.start()
            for poller in pollers:
                poller.start()
            self.imap = pollers
            self._install_signals()
            self.ops = Operations(config, self, worker=worker)
            await self.ops.start()  # READY=1: the listeners are bound
            self.ready.set()
            log.info("gateway ready: smtp %s", ", ".join(config.smtp.listen))
            await self.stopping.wait()
            log.info("shutting down: no new sessions, finishing those in flight")
        finally:
            await self._shutdown(spool, worker, tasks)
            checkpointer.stop()
        log.info("gateway stopped")
        return 0

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    async def _shutdown(
        self, spool: SpoolWriter, worker: WorkerProcess, tasks: list[asyncio.Task]
    ) -> None:
        self.stopping.set()
        if self.ops is not None:
            await self.ops.close()  # STOPPING=1
        if self.smtp is not None:
            await self.smtp.close(SHUTDOWN_GRACE_SECONDS)
        await asyncio.gather(*(asyncio.to_thread(poller.stop) for poller in self.imap))
        await asyncio.to_thread(spool.stop)
        await asyncio.to_thread(worker.stop)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, SHUTDOWN_GRACE_SECONDS)
