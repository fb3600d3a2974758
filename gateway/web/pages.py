"""The status page's HTML: the Jinja environment and the data each page shows.

Mail content is hostile, so every template is autoescaped and raw HTML mail is shown as text,
never rendered. The data functions run in the store's thread (`StoreThread.call`).
"""

from __future__ import annotations

import time
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

from gateway import display
from gateway.mail.parse import parse_message
from gateway.store import ReportStore

BODY_CHARS = 100_000  # of a mail body shown on the detail page


class Pages:
    """Renders the templates in `gateway/web/templates/` into responses."""

    def __init__(self) -> None:
        self.env = _environment()

    def render(self, template: str, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(now=time.time(), **context)
        return HTMLResponse(html)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.web", "templates"),
        autoescape=True,  # mail content is hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = display.when
    env.filters["age"] = display.age_of
    return env


# -- data for the pages (run in the store's thread) ---------------------------------------------


def index_data(store: ReportStore) -> dict[str, Any]:
    jobs = [{"job": job, "subject": _subject(head)} for job, head in store.recent_jobs(50)]
    outbox = store.outbox(("pending", "dead"), limit=200)
    return {
        "jobs": jobs,
        "incidents": store.incidents(open_only=True, limit=200),
        "pending": [o for o in outbox if o.state == "pending"],
        "dead": [o for o in outbox if o.state == "dead"],
        "imap_failures": store.imap_failures(),  # templates/imap_failures.html
    }


def job_data(store: ReportStore, job: int) -> dict[str, Any] | None:
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
