"""The web app: `/healthz`, Prometheus `/metrics`, and a read-only status page, as Starlette routes.

`WebApp` is the ASGI app `gateway serve` hands to `WebServer`; it holds references to the
running service's parts, which a reload swaps (`settings`, `notify`), and every handler reads
them per request. Every answer passes `gateway.web.hardening` (security headers, size and time
limits, a logged 500 instead of a stack trace).

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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.config import WebSettings
from gateway.store import StoreThread
from gateway.web import pages
from gateway.web.hardening import Limits, RequestLimits, SecureResponses
from gateway.web.metrics import CONTENT_TYPE, GatewayMetrics, LiveState
from gateway.web.notify import NotifyEndpoint

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
class Check:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


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

    def __post_init__(self) -> None:
        self.pages = pages.Pages()
        self.app = Starlette(
            routes=[
                Route("/", self.index, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/metrics", self.metrics_page, methods=["GET"]),
                Route("/jobs/{job:rowid}", self.job_page, methods=["GET"]),
                Route("/outbox/{item:rowid}/retry", self.retry, methods=["POST"]),
                Route("/notify/{theme}", self.notify_theme, methods=["POST"]),
            ],
            middleware=[Middleware(SecureResponses), Middleware(RequestLimits, self.limits)],
        )
        self.app.router.redirect_slashes = False  # an unknown path is a 404, not a redirect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # -- health and metrics ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        checks = await self.health()
        ok = all(c.ok for c in checks.values())
        body = {"status": "ok" if ok else "failing", **{k: asdict(v) for k, v in checks.items()}}
        text = json.dumps(body, indent=2)
        return Response(text, 200 if ok else 503, media_type="application/json")

    async def health(self) -> dict[str, Check]:
        now = time.time()
        checks = {"smtp": self._smtp_check(), "store": await self._store_check()}
        checks["outbox"] = await self._outbox_check(now)
        if self.live.imap:
            checks["imap"] = self._imap_check(now)
        return checks

    def _smtp_check(self) -> Check:
        smtp = self.live.smtp
        if smtp is None:
            return Check(False, {"error": "not started"})
        bound = [f"{h}:{p}" for h, p in smtp.bound]
        return Check(bool(bound) and not smtp.closing, {"listening": bound})

    async def _store_check(self) -> Check:
        try:
            at = await asyncio.wait_for(self.store.call(lambda s: s.heartbeat()), STORE_TIMEOUT)
        except Exception as exc:  # any failure to commit is exactly what this check reports
            return Check(False, {"error": f"{type(exc).__name__}: {exc}"})
        return Check(True, {"heartbeat": at})

    async def _outbox_check(self, now: float) -> Check:
        try:
            pending, oldest = await asyncio.wait_for(
                self.store.call(lambda s: s.outbox_stats()), STORE_TIMEOUT
            )
        except Exception as exc:
            return Check(False, {"error": f"{type(exc).__name__}: {exc}"})
        age = now - oldest if oldest else 0.0
        limit = self.settings.outbox_max_age_seconds
        return Check(age <= limit, {"pending": pending, "oldest_age_seconds": round(age, 1),
                                    "max_age_seconds": limit})  # fmt: skip

    def _imap_check(self, now: float) -> Check:
        limit = self.settings.imap_max_silence_seconds
        accounts, ok = {}, True
        for poller in self.live.imap:
            since = now - (poller.last_success or self.started_at)
            fine = poller.healthy and since <= limit  # unhealthy: its connection failed
            ok = ok and fine
            accounts[poller.settings.name] = {
                "ok": fine,
                "state": poller.state,
                "last_success": poller.last_success,
            }
        return Check(ok, {"accounts": accounts, "max_silence_seconds": limit})

    async def metrics_page(self, request: Request) -> Response:
        snapshot = await self.store.call(self.metrics.read)
        return Response(self.metrics.render(snapshot, self.live), media_type=CONTENT_TYPE)

    # -- status page -------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        data = await self.store.call(pages.index_data)
        checks = await self.health()
        notice = request.query_params.get("retried", "")
        return self.pages.render(
            "index.html",
            checks=checks,
            notice=f"Outbox item {notice} re-queued." if notice.isdigit() else "",
            retry_enabled=bool(self.settings.token),
            **data,
        )

    async def job_page(self, request: Request) -> Response:
        job: int = request.path_params["job"]
        data = await self.store.call(lambda s: pages.job_data(s, job))
        if data is None:
            raise HTTPException(404, f"no job {job}")
        return self.pages.render("job.html", **data)

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
        self.on_requeue()
        return RedirectResponse(f"/?retried={item}#outbox", status_code=303)

    async def notify_theme(self, request: Request) -> Response:
        if self.notify is None:
            raise HTTPException(404, "POST /notify is off: set [web] notify_token and [outgoing]")
        return await self.notify(request, request.path_params["theme"])


def _check_origin(request: Request) -> None:
    """Defence in depth next to the token: a browser's cross-site POST names its origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "cross-origin request refused")


async def _form_field(request: Request, name: str) -> str:
    """One field of an application/x-www-form-urlencoded body ('' when absent)."""
    text = (await request.body()).decode("utf-8", errors="replace")
    return parse_qs(text, keep_blank_values=True).get(name, [""])[0]
