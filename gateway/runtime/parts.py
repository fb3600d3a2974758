"""The running parts of `gateway serve`, as one typed record.

`Service.run` builds it and hands it to what needs the parts (the control plane, shutdown);
nothing holds the service itself or reaches into it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.intake.imap import ImapPoller
from gateway.intake.smtp_listener import SmtpListener
from gateway.intake.spool import SpoolWriter
from gateway.logs import LEVELS
from gateway.runtime.reload import Generation
from gateway.runtime.worker import WorkerProcess


@dataclass
class Runtime:
    """The mail path of one `serve`: listeners, spool, worker child, and what they run."""

    stopping: asyncio.Event  # set: shut down
    generation: Generation  # the configuration running now (the last good one)
    spool: SpoolWriter
    worker: WorkerProcess
    smtp: SmtpListener
    imap: list[ImapPoller]

    def apply(self, generation: Generation) -> None:
        """An accepted reload: new sessions and the worker switch; those in flight finish as
        they started."""
        self.generation = generation
        self.worker.configure(generation.for_worker())
        self.smtp.reconfigure(generation.config.services)
        level = generation.config.gateway.log_level
        logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))
