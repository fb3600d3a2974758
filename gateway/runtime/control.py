"""The control plane of `gateway serve`: systemd notify and watchdog, hot reload, the web
listener (health, metrics, status page) and the retention schedule.

`Service` builds the mail path (`Runtime`); this attaches to it once the SMTP listener is bound,
so `READY=1` means "mail is accepted now". Everything here is best effort for mail: a web port
that is taken is logged and skipped, it never stops the gateway from taking mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from gateway.runtime import retention
from gateway.runtime.parts import Runtime
from gateway.runtime.reload import Generation, Reloader
from gateway.runtime.systemd import ServiceManager
from gateway.store import StoreThread
from gateway.web.metrics import LiveState
from gateway.web.notify import NotifyEndpoint
from gateway.web.pagerduty_webhook import PagerDutyWebhook
from gateway.web.server import WebServer
from gateway.web.status import WebApp

log = logging.getLogger(__name__)

WORKER_WATCH_SECONDS = 1.0  # the supervisor itself looks every 1-5 s


class ControlPlane:
    """Start with `start()` after the listeners are bound; `close()` first thing on shutdown."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.manager = ServiceManager()
        self.reloader = Reloader(
            runtime.generation,
            self._apply,
            on_start=self.manager.reloading,
            on_end=lambda: self.manager.ready(),
        )
        self.store = StoreThread(runtime.generation.config.store_location, "ops")
        self.web: WebApp | None = None
        self.http: WebServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._reloads: set[asyncio.Task] = set()

    async def start(self) -> None:
        stop = self.runtime.stopping
        await self._start_web()
        self._install_sighup()
        self._tasks += [
            asyncio.create_task(self.manager.watchdog(stop), name="watchdog"),
            asyncio.create_task(self.reloader.watch(stop), name="reload-watch"),
            asyncio.create_task(
                retention.run_schedule(
                    self.store, lambda: self.reloader.config.gateway.retention_days, stop
                ),
                name="retention",
            ),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_failure)
        listen = self.runtime.generation.config.smtp.listen
        self.manager.ready(f"accepting mail on {', '.join(listen)}")

    async def close(self) -> None:
        """STOPPING=1, stop the web listener and the background tasks."""
        self.manager.stopping()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self.http is not None:
            await self.http.close()
        for task in [*self._tasks, *self._reloads]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._reloads, return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    async def _start_web(self) -> None:
        runtime = self.runtime
        listen = runtime.generation.config.web.listen
        if not listen:
            return
        live = LiveState(runtime.smtp, runtime.imap, self.reloader, runtime.worker)
        self.web = WebApp(
            self.store,
            runtime.generation.config.web,
            live=live,
            on_requeue=runtime.worker.wake_outbox,
            notify=self._notify_endpoint(),
            services=runtime.generation.config.services,
            maintenance=runtime.generation.config.maintenance,
            heartbeats=runtime.generation.config.heartbeats,
            pagerduty=self._pagerduty_webhook(),
        )
        self._tasks.append(asyncio.create_task(self._watch_worker(), name="worker-watch"))
        # the latency histogram counts jobs decided from now on, like any per-process metric
        self.web.metrics.last_job = await self.store.call(lambda s: s.last_decided_job())
        http = WebServer(listen, self.web)
        try:
            await http.start()
        except OSError as exc:
            log.error("web listener disabled: cannot listen on %s: %s", listen, exc.strerror or exc)
            return
        self.http = http
        log.info("web listening on http://%s (healthz, metrics, status page)", listen)

    def _notify_endpoint(self) -> NotifyEndpoint | None:
        config = self.runtime.generation.config
        if not (config.web.notify_token and config.outgoing):
            return None
        return NotifyEndpoint(
            self.store,
            config.gateway.templates_dir,
            config.outgoing,
            config.web.notify_token,
            on_queued=self.runtime.worker.wake_outbox,
        )

    def _pagerduty_webhook(self) -> PagerDutyWebhook | None:
        secrets = self.runtime.generation.config.pagerduty.webhook_secret
        if not secrets:
            return None
        return PagerDutyWebhook(self.store, secrets, on_stored=self.runtime.worker.wake)

    def _install_sighup(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reloader.reload("SIGHUP"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def _apply(self, new: Generation) -> None:
        """The mail path first (worker, SMTP), then what this side holds."""
        self.runtime.apply(new)
        if self.web is not None:
            self.web.settings = new.config.web
            self.web.services = new.config.services  # routing keys: local mode or not
            self.web.maintenance = new.config.maintenance
            self.web.heartbeats = new.config.heartbeats
            self.web.notify = self._notify_endpoint()  # recompiles the themes
            self.web.pagerduty = self._pagerduty_webhook()  # secrets may be rotated

    async def _watch_worker(self) -> None:
        """Health input: the supervisor only counts restarts; this notes when they happen,
        so /healthz can tell one crash from a crash loop."""
        while not self.runtime.stopping.is_set():
            if self.web is not None:
                self.web.restarts.observe(self.runtime.worker.restarts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runtime.stopping.wait(), WORKER_WATCH_SECONDS)


def _log_failure(task: asyncio.Task) -> None:
    """A background task that dies must say so: silence here would hide a stuck watchdog."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception(), exc_info=task.exception())
