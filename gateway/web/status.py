"""The web listener: `/healthz`, Prometheus `/metrics`, and a read-only status page.

The page shows hostile content (mail subjects, bodies, HTML) so every template is autoescaped
and the Content-Security-Policy forbids scripts; raw HTML mail is shown as text, never
rendered. The only state change is "retry this dead letter", a POST that must carry `[web]
token` in the form (compared in constant time): a cross-site page cannot know it, so the form
is CSRF-safe without cookies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any
from urllib.parse import urlsplit

import jinja2

from gateway.config import WebSettings
from gateway.mail.parse import parse_message
from gateway.store import ReportStore, StoreThread
from gateway.web.httpserver import HttpError, Request, Response
from gateway.web.metrics import CONTENT_TYPE, GatewayMetrics, LiveState
from gateway.web.notify import NotifyEndpoint

HTML = "text/html; charset=utf-8"
BODY_CHARS = 100_000  # of a mail body shown on the detail page
STORE_TIMEOUT = 5.0


@dataclass
class Check:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class WebApp:
    """Routes; holds references to the running service's parts (swapped on reload)."""

    store: StoreThread
    settings: WebSettings
    live: LiveState = field(default_factory=LiveState)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    on_requeue: Callable[[], None] = lambda: None  # wake the outbox worker
    started_at: float = field(default_factory=time.time)
    notify: NotifyEndpoint | None = None  # POST /notify/<theme>, when configured

    def __post_init__(self) -> None:
        self.templates = _environment()

    async def __call__(self, request: Request) -> Response:
        route = self._route(request)
        if route is None:
            raise HttpError(404, "not found")
        method, handler, arg = route
        if request.method not in (method, "HEAD" if method == "GET" else method):
            raise HttpError(405, "method not allowed")
        return await handler(request, arg) if arg is not None else await handler(request)

    def _route(self, request: Request) -> tuple[str, Any, int | str | None] | None:
        path = request.path
        fixed = {"/": self.index, "/healthz": self.healthz, "/metrics": self.metrics_page}
        if path in fixed:
            return "GET", fixed[path], None
        if match := re.fullmatch(r"/jobs/(\d{1,18})", path):
            return "GET", self.job_page, int(match.group(1))
        if match := re.fullmatch(r"/outbox/(\d{1,18})/retry", path):
            return "POST", self.retry, int(match.group(1))
        if match := re.fullmatch(r"/notify/([^/]{1,64})", path):
            return "POST", self.notify_theme, match.group(1)
        return None

    # -- health and metrics ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        checks = await self.health()
        ok = all(c.ok for c in checks.values())
        body = {"status": "ok" if ok else "failing", **{k: asdict(v) for k, v in checks.items()}}
        return Response(200 if ok else 503, json.dumps(body, indent=2).encode(), "application/json")

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
            fine = since <= limit
            ok = ok and fine
            accounts[poller.settings.name] = {
                "ok": fine,
                "state": poller.state,
                "last_success": poller.last_success,
            }
        return Check(ok, {"accounts": accounts, "max_silence_seconds": limit})

    async def metrics_page(self, request: Request) -> Response:
        snapshot = await self.store.call(self.metrics.read)
        return Response(200, self.metrics.render(snapshot, self.live), CONTENT_TYPE)

    # -- status page -------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        data = await self.store.call(_index_data)
        checks = await self.health()
        notice = request.query.get("retried", [""])[0]
        return self._page(
            "index.html",
            checks=checks,
            notice=f"Outbox item {notice} re-queued." if notice.isdigit() else "",
            retry_enabled=bool(self.settings.token),
            **data,
        )

    async def job_page(self, request: Request, job: int) -> Response:
        data = await self.store.call(lambda s: _job_data(s, job))
        if data is None:
            raise HttpError(404, f"no job {job}")
        return self._page("job.html", **data)

    async def retry(self, request: Request, item: int) -> Response:
        self._check_origin(request)
        expected = self.settings.token
        if not expected:
            raise HttpError(403, "retry is disabled: set [web] token in config.toml")
        given = request.form().get("token", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HttpError(403, "wrong token")
        count = await self.store.call(lambda s: s.requeue_outbox(item))
        if not count:
            raise HttpError(404, f"outbox item {item} is not a dead letter")
        self.on_requeue()
        return Response(303, b"", headers={"Location": f"/?retried={item}#outbox"})

    async def notify_theme(self, request: Request, theme: str) -> Response:
        if self.notify is None:
            raise HttpError(404, "POST /notify is off: set [web] notify_token and [outgoing]")
        return await self.notify(request, theme)

    def _check_origin(self, request: Request) -> None:
        """Defence in depth next to the token: a browser's cross-site POST names its origin."""
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            raise HttpError(403, "cross-origin request refused")

    def _page(self, template: str, **context: Any) -> Response:
        html = self.templates.get_template(template).render(now=time.time(), **context)
        return Response(200, html.encode(), HTML)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.web", "templates"),
        autoescape=True,  # mail content is hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["age"] = lambda ts: _age(time.time() - ts) if ts else "-"
    return env


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- data for the pages (run in the store's thread) ---------------------------------------------


def _index_data(store: ReportStore) -> dict[str, Any]:
    jobs = [{"job": job, "subject": _subject(head)} for job, head in store.recent_jobs(50)]
    outbox = store.outbox(("pending", "dead"), limit=200)
    return {
        "jobs": jobs,
        "incidents": store.incidents(open_only=True, limit=200),
        "pending": [o for o in outbox if o.state == "pending"],
        "dead": [o for o in outbox if o.state == "dead"],
    }


def _job_data(store: ReportStore, job: int) -> dict[str, Any] | None:
    detail = store.job_detail(job)
    if detail is None:
        return None
    raw = store.raw_message(detail["message"])
    mail = parse_message(raw) if raw else None
    return {
        "detail": detail,
        "mail": mail,
        "body": (mail.text[:BODY_CHARS] if mail else ""),
        "html_source": (mail.html[:BODY_CHARS] if mail else ""),
        "events": store.events(message=detail["message"], limit=50),
        "purged": raw is None,
    }


def _subject(head: bytes) -> str:
    """The decoded Subject from the first bytes of a mail; '' when unreadable."""
    try:
        value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Subject", "")
        return str(make_header(decode_header(str(value))))[:300]
    except Exception:  # hostile or truncated headers: show nothing rather than fail the page
        return ""
