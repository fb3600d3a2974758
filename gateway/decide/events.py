"""The PagerDuty Events API v2 body a decision turns into, stored in the outbox as it will be sent.

The routing key is not part of it: it is a secret and may be rotated, so the sender adds it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

CLIENT_NAME = "email-gateway"
MAX_SUMMARY = 1024
MAX_EVENT_BYTES = 512 * 1024
ACTIONS = ("trigger", "acknowledge", "resolve")


def pagerduty_order_key(service: str, dedup_key: str) -> str:
    """The outbox order key of a service's events for one incident: they go out in order."""
    return f"pagerduty:{service}:{dedup_key}"


def build_event(
    *,
    action: str,
    dedup_key: str,
    summary: str = "",
    severity: str = "critical",
    source: str = CLIENT_NAME,
    component: str = "",
    rule: str = "",
    timestamp: datetime | None = None,
    details: Mapping[str, Any] | None = None,
    links: list[dict[str, str]] | None = None,
    client_url: str = "",
) -> dict[str, Any]:
    """An Events API v2 body minus `routing_key`; trigger-only fields only on triggers."""
    if action not in ACTIONS:
        raise ValueError(f"unknown event action {action!r}")
    event: dict[str, Any] = {"event_action": action, "dedup_key": dedup_key[:255]}
    if action != "trigger":
        return event
    payload: dict[str, Any] = {
        "summary": (summary or dedup_key)[:MAX_SUMMARY],
        "source": source,
        "severity": severity,
        "timestamp": (timestamp or datetime.now(UTC)).isoformat(),
    }
    if component:
        payload["component"] = component
    if rule:
        payload["class"] = rule
    if details:
        payload["custom_details"] = dict(details)
    event["payload"] = payload
    event["client"] = CLIENT_NAME
    if client_url:
        event["client_url"] = client_url
    if links:
        event["links"] = [link for link in links if link.get("href")]
    return _fit(event)


def _fit(event: dict[str, Any]) -> dict[str, Any]:
    """Keep the request under PagerDuty's 512 KB by shortening custom_details values."""
    while len(json.dumps(event).encode()) > MAX_EVENT_BYTES - 1024:
        details = event["payload"].get("custom_details") or {}
        longest = max(details, key=lambda k: len(str(details[k])), default=None)
        if longest is None or len(str(details[longest])) < 64:
            event["payload"].pop("custom_details", None)
            break
        value = str(details[longest])
        details[longest] = value[: len(value) // 2] + " [truncated]"
    return event
