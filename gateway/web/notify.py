"""`POST /notify/<theme>`: for helpdesks that can call a webhook but cannot template mail.

The request body is the case as JSON (the same context `gateway notify --case` reads); the theme
renders the email and it is queued in the durable outbox like any other mail, so a relay outage
delays it and loses nothing. Authenticated with `Authorization: Bearer <[web] notify_token>`,
compared in constant time; the token comes from the environment (`${GATEWAY_NOTIFY_TOKEN}`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.config import OutgoingSettings
from gateway.decide import outgoing_mail
from gateway.errors import ThemeError
from gateway.store import StoreThread
from gateway.themes import render as themes

THEME_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_DEPTH = 32  # of nested objects/arrays in a case: deeper is an attack, not a helpdesk case


@dataclass
class NotifyEndpoint:
    store: StoreThread
    templates_dir: Path
    outgoing: OutgoingSettings
    token: str
    on_queued: Callable[[], None] = lambda: None  # wake the mail outbox

    def __post_init__(self) -> None:
        # compiled once: a reload (themes changed) builds a new endpoint
        self.themes = themes.Themes(self.templates_dir)

    async def __call__(self, request: Request, theme: str) -> Response:
        self._authenticate(request)
        context = _json_object(await request.body())
        msg = await asyncio.to_thread(self._render, theme, context)
        sender = outgoing_mail.envelope_sender(self.outgoing.from_addr)
        try:
            item = await self.store.call(
                lambda s: outgoing_mail.queue_mail(s, msg, mail_from=sender)
            )
        except ValueError as exc:  # e.g. the theme rendered no recipient
            raise HTTPException(400, str(exc)) from None
        self.on_queued()
        body = {
            "queued": item,
            "message_id": msg["Message-ID"],
            "to": outgoing_mail.recipients(msg),
        }
        return JSONResponse(body, 202)

    def _authenticate(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.token.encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token")

    def _render(self, theme: str, context: dict[str, Any]):
        if not THEME_NAME.fullmatch(theme):
            raise HTTPException(404, "no such theme")
        if theme not in self.themes.names():
            raise HTTPException(404, f"no theme {theme!r}")
        try:
            # the helpdesk's notification, rendered on its behalf to be taken in: no loop stamp
            return self.themes.render(
                theme, context, default_from=self.outgoing.from_addr, for_intake=True
            )
        except ThemeError as exc:
            raise HTTPException(400, f"theme {theme!r} failed: {exc}") from None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"null")
    except ValueError as exc:
        raise HTTPException(400, f"body is not JSON: {exc}") from None
    except RecursionError:  # the parser recurses per level: 30,000 levels exhaust the stack
        raise HTTPException(400, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "body must be a JSON object (the case)")
    if _depth_exceeds(value, MAX_DEPTH):  # the theme would walk it recursively too
        raise HTTPException(400, f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit`; iterative, so depth cannot break it."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item)
    return False
