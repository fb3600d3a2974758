"""The web app: `/healthz`, Prometheus `/metrics`, and a read-only status page, as Starlette routes.

`WebApp` is the ASGI app `gateway serve` hands to `WebServer`; it holds references to the
running service's parts, which a reload swaps (`settings`, `services`, `notify`), and every
handler reads them per request. Every answer passes `gateway.web.hardening` (security headers,
size and time limits, a logged 500 instead of a stack trace).

Health is `gateway.web.health` (each condition that impairs paging, in words); the pages are
`/` (health, charts, incidents with what PagerDuty was told, outbox, recent mail),
`/messages/N` (a mail by the id `queued as N` gave; `/jobs/N` redirects there),
`/incident?service=&key=` (its timeline) and `/outbox/N` (an item and its attempts).

The page shows hostile content (mail subjects, bodies, HTML) so every template is autoescaped
and the Content-Security-Policy forbids scripts. The only state change is "retry this dead
letter", a POST that must carry `[web] token` in the form (compared in constant time): a
cross-site page cannot know it, so the form is CSRF-safe without cookies; a POST that names
another origin is refused as well.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.config import ServiceSettings, WebSettings
from gateway.config_time import HeartbeatSettings
from gateway.schedules import MaintenanceWindow
from gateway.store import StoreThread
from gateway.web import chart, health, pages
from gateway.web.hardening import Limits, RequestLimits, SecureResponses
from gateway.web.health import Check, RestartHistory
from gateway.web.metrics import CONTENT_TYPE, GatewayMetrics, LiveState
from gateway.web.notify import NotifyEndpoint
from gateway.web.pagerduty_webhook import PagerDutyWebhook

log = logging.getLogger(__name__)

STORE_TIMEOUT = 5.0


class RowId(Convertor[int]):
    """`{name:rowid}`: a database row id, at most 18 digits (a longer one is no route)."""

    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("rowid", RowId())


@dataclass
class WebApp:
    """The routes; holds references to the running service's parts (swapped on reload)."""

    store: StoreThread
    settings: WebSettings
    live: LiveState = field(default_factory=LiveState)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    on_requeue: Callable[[], None] = lambda: None  # wake the outbox worker
    started_at: float = field(default_factory=time.time)
    notify: NotifyEndpoint | None = None  # POST /notify/<theme>, when configured
    limits: Limits = field(default_factory=Limits)
    services: Sequence[ServiceSettings] = ()  # the running configuration's (swapped on reload)
    maintenance: tuple[MaintenanceWindow, ...] = ()  # ... and these two as well
    heartbeats: tuple[HeartbeatSettings, ...] = ()
    restarts: RestartHistory = field(default_factory=RestartHistory)
    pagerduty: PagerDutyWebhook | None = None  # POST /pagerduty/webhook, when configured

    def __post_init__(self) -> None:
        self.pages = pages.Pages()
        self.app = Starlette(
            routes=[
                Route("/", self.index, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/metrics", self.metrics_page, methods=["GET"]),
                Route("/messages/{message:rowid}", self.message_page, methods=["GET"]),
                Route("/jobs/{job:rowid}", self.job_redirect, methods=["GET"]),
                Route("/incident", self.incident_page, methods=["GET"]),
                Route("/outbox/{item:rowid}", self.outbox_page, methods=["GET"]),
                Route("/outbox/{item:rowid}/retry", self.retry, methods=["POST"]),
                Route("/notify/{theme}", self.notify_theme, methods=["POST"]),
                Route("/pagerduty/webhook", self.pagerduty_webhook, methods=["POST"]),
            ],
            middleware=[
                Middleware(SecureResponses),
                Middleware(RequestLimits, self.limits),
                # a day of per-minute bars is ~1 MB of SVG and compresses ~10x; no page
                # carries a secret for a compression side channel to reveal
                Middleware(GZipMiddleware, minimum_size=4096, compresslevel=6),
            ],
        )
        self.app.router.redirect_slashes = False  # an unknown path is a 404, not a redirect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # -- health and metrics ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        checks = await self.health()
        ok = all(c.ok for c in checks.values())
        body = {
            "status": "ok" if ok else "failing",
            "reasons": [c.words for c in checks.values() if not c.ok],
            **{name: check.as_json() for name, check in checks.items()},
        }
        text = json.dumps(body, indent=2)
        return Response(text, 200 if ok else 503, media_type="application/json")

    async def health(self) -> dict[str, Check]:
        """Every check; any failing one makes /healthz 503 and the page red."""
        now, settings, live = time.time(), self.settings, self.live
        facts, error = await self._facts()
        checks = {
            "smtp": health.smtp_check(live.smtp),
            "store": health.store_check(facts, error),
            "outbox": health.outbox_check(facts, settings, now),
            "processing": health.processing_check(facts, settings, now),
            "dead_letters": health.dead_letter_check(facts, settings, now),
            "pagerduty": health.pagerduty_check(self.services),
        }
        if self.pagerduty is not None or (facts is not None and facts.webhooks_pending):
            checks["webhooks"] = health.webhook_check(facts, settings, now)
        if live.worker is not None:
            self.restarts.observe(live.worker.restarts, now)
            checks["worker"] = health.worker_check(self.restarts, settings, now)
        if live.imap:
            checks["imap"] = health.imap_check(live.imap, settings, self.started_at, now)
        if live.reloader is not None:
            refusal = live.reloader.last_refusal
            checks["reload"] = health.reload_check(refusal, live.reloader.generation)
        return checks

    async def _facts(self) -> tuple[health.StoreFacts | None, str]:
        try:
            facts = await asyncio.wait_for(self.store.call(health.read_facts), STORE_TIMEOUT)
        except Exception as exc:  # any failure to commit is exactly what the store check reports
            return None, f"{type(exc).__name__}: {exc}"
        return facts, ""

    async def metrics_page(self, request: Request) -> Response:
        snapshot = await self.store.call(self.metrics.read)
        return Response(self.metrics.render(snapshot, self.live), media_type=CONTENT_TYPE)

    # -- status page -------------------------------------------------------------------------

    def _context(self) -> pages.PageContext:
        local = frozenset(health.local_services(self.services))
        return pages.PageContext(
            self.settings, local, maintenance=self.maintenance, heartbeats=self.heartbeats
        )

    async def index(self, request: Request) -> Response:
        names = [s.name for s in self.services]
        try:
            query = pages.parse_index_query(_multi(request), names)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        context = self._context()
        data = await self.store.call(lambda s: pages.index_data(s, query, context))
        checks = await self.health()
        notice = request.query_params.get("retried", "")
        return self.pages.render(
            "index.html",
            checks=checks,
            notice=f"Outbox item {notice} re-queued." if notice.isdigit() else "",
            retry_enabled=bool(self.settings.token),
            query=query,
            services=names,
            outcomes=pages.FILTER_OUTCOMES,
            windows=chart.WINDOWS_HOURS,
            refresh=self.settings.refresh_seconds,
            stale_hours=self.settings.stale_incident_hours,
            **data,
        )

    async def message_page(self, request: Request) -> Response:
        message: int = request.path_params["message"]
        data = await self.store.call(lambda s: pages.message_data(s, message))
        if data is None:
            raise HTTPException(404, f"no message {message}")
        return self.pages.render("message.html", **data)

    async def job_redirect(self, request: Request) -> Response:
        """Old links name a job: its message's page, at that job's decision."""
        job: int = request.path_params["job"]
        detail = await self.store.call(lambda s: s.job_detail(job))
        if detail is None:
            raise HTTPException(404, f"no job {job}")
        return RedirectResponse(f"/messages/{detail['message']}#job-{job}", status_code=302)

    async def incident_page(self, request: Request) -> Response:
        service = request.query_params.get("service", "")
        key = request.query_params.get("key", "")
        if not service or not key:
            raise HTTPException(400, "name the incident: /incident?service=NAME&key=KEY")
        context = self._context()
        data = await self.store.call(lambda s: pages.incident_data(s, service, key, context))
        if data is None:
            raise HTTPException(404, f"no incident {key!r} of service {service!r}")
        return self.pages.render("incident.html", **data)

    async def outbox_page(self, request: Request) -> Response:
        item: int = request.path_params["item"]
        data = await self.store.call(lambda s: pages.outbox_data(s, item))
        if data is None:
            raise HTTPException(404, f"no outbox item {item}")
        return self.pages.render("outbox.html", retry_enabled=bool(self.settings.token), **data)

    async def retry(self, request: Request) -> Response:
        item: int = request.path_params["item"]
        _check_origin(request)
        expected = self.settings.token
        if not expected:
            raise HTTPException(403, "retry is disabled: set [web] token in config.toml")
        given = await _form_field(request, "token")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(403, "wrong token")
        outcome = await self.store.call(lambda s: s.retry_outbox(item))
        if outcome.refused:  # 409: out of order (the CLI's --force); 404: none or not dead
            refusal = outcome.refused[0]
            raise HTTPException(409 if refusal.overridable else 404, refusal.reason)
        entry = await self.store.call(lambda s: s.outbox_entry(item))
        log.info(
            "outbox item %d (message %s) re-queued from the status page",
            item,
            entry.message if entry else "-",
        )
        self.on_requeue()
        return RedirectResponse(f"/?retried={item}#outbox", status_code=303)

    async def notify_theme(self, request: Request) -> Response:
        if self.notify is None:
            raise HTTPException(404, "POST /notify is off: set [web] notify_token and [outgoing]")
        return await self.notify(request, request.path_params["theme"])

    async def pagerduty_webhook(self, request: Request) -> Response:
        if self.pagerduty is None:
            raise HTTPException(404, "webhooks are off: set [pagerduty] webhook_secret")
        return await self.pagerduty(request)


def _multi(request: Request) -> dict[str, list[str]]:
    """Query parameters with every value of a repeated name."""
    params = request.query_params
    return {name: params.getlist(name) for name in params}


def _check_origin(request: Request) -> None:
    """Defence in depth next to the token: a browser's cross-site POST names its origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-origin request refused")


async def _form_field(request: Request, name: str) -> str:
    """One field of an application/x-www-form-urlencoded body ('' when absent)."""
    text = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(text, keep_blank_values=True).get(name, [""])[0]
