"""`POST /pagerduty/webhook`: PagerDuty Webhooks v3 deliveries, verified and stored durably.

PagerDuty signs the raw body with each subscription secret: `X-PagerDuty-Signature:
v1=<hex HMAC-SHA256>`, several comma-separated during a rotation (accept if any matches, and
`[pagerduty] webhook_secret` may list several secrets too). Every comparison is constant time.
A missing or wrong signature gets 401 and changes nothing; a body that is not a Webhooks v3
event gets 400; over 256 KB the request limits answer 413 before this runs.

The delivery is committed before the 2xx (202), so an answer PagerDuty got is never lost; the
worker decides it afterwards (`gateway.decide.pagerduty_side`). A redelivery (the same
`X-Webhook-Id`, or the same `event.id`) is answered 200 and acts no more. The answer needs one
small commit, far within PagerDuty's 5 s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.store import StoreThread

MAX_SIGNATURES = 16  # a rotation has two; more is somebody guessing


def signature_matches(body: bytes, header: str, secrets: Sequence[str]) -> bool:
    """Whether any `v1=` signature of `header` is the HMAC-SHA256 of `body` under any secret.

    Every pair is compared (no early exit on the first match), in constant time."""
    given = [
        value.strip()[3:].lower().encode()
        for value in header.split(",")[:MAX_SIGNATURES]
        if value.strip().startswith("v1=")
    ]
    matched = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
        for signature in given:
            matched |= hmac.compare_digest(expected, signature)
    return matched


def sign(body: bytes, secret: str) -> str:
    """The `X-PagerDuty-Signature` value PagerDuty would send (for tests and docs)."""
    return "v1=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class PagerDutyWebhook:
    store: StoreThread
    secrets: tuple[str, ...]
    on_stored: Callable[[], None] = lambda: None  # wake the worker to decide it

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        header = request.headers.get("x-pagerduty-signature", "")
        if not header or not signature_matches(body, header, self.secrets):
            raise HTTPException(401, "missing or wrong X-PagerDuty-Signature")
        event = _event(body)
        webhook_id = request.headers.get("x-webhook-id", "").strip()[:200] or None
        event_id = _text(event.get("id"))[:200] or None
        fields = _index_fields(event)
        stored = await self.store.call(
            lambda s: s.add_pagerduty_event(
                body=body.decode("utf-8", "replace"),
                received_at=time.time(),
                webhook_id=webhook_id,
                event_id=event_id,
                **fields,
            )
        )
        if stored is None:
            return JSONResponse({"duplicate": True}, 200)
        self.on_stored()
        return JSONResponse({"stored": stored}, 202)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _event(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"body is not JSON: {exc}") from None
    event = value.get("event") if isinstance(value, dict) else None
    if not isinstance(event, dict) or not _text(event.get("event_type")):
        raise HTTPException(400, 'not a Webhooks v3 body: expected {"event": {"event_type", ...}}')
    return event


def _index_fields(event: dict[str, Any]) -> dict[str, str]:
    """What the store indexes a delivery by: type, dedup key, PagerDuty's incident id."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    reference = data.get("incident") if isinstance(data.get("incident"), dict) else None
    incident = reference if reference is not None else data
    return {
        "event_type": _text(event.get("event_type"))[:100],
        "incident_key": _text(incident.get("incident_key"))[:255],
        "pd_incident": _text(incident.get("id"))[:100],
    }
