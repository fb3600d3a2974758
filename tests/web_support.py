"""Helpers for the web app's tests: one request through `httpx.ASGITransport`, and store
scenarios (a paged incident, a dead letter) written through the store's own API."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from gateway.config import ServiceSettings
from gateway.decide.events import pagerduty_order_key
from gateway.store import JobDecision, OutboxResult, Store
from tests.store_support import incident, mail

SMTP_UP = SimpleNamespace(
    bound=[("127.0.0.1", 2525)], closing=False, active_sessions=0, pacing_counts={}
)


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the ASGI app, on a fresh event loop (as the store thread expects)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def service(name: str = "helpdesk", routing_key: str | None = "R" * 32) -> ServiceSettings:
    return ServiceSettings(name, ("desk@*",), (Path("helpdesk.toml"),), routing_key=routing_key)


@dataclass(frozen=True)
class Paged:
    message: int
    job: int
    item: int


def page_for(
    store: Store,
    key: str,
    *,
    service: str = "helpdesk",
    results: tuple[OutboxResult, ...] | None = None,
    opened_at: float | None = None,
) -> Paged:
    """A mail that triggered `key`: its job decided, the incident open, the event queued and
    then given `results` (attempts, in order; `id=0` stands for the queued item)."""
    raw = f"Subject: {key}\r\nFrom: desk@helpdesk.example\r\n\r\nStatus: New\r\n".encode()
    [accepted] = store.accept([mail(f"{key}-{time.time()}", (service,), raw=raw)])
    [job] = [j for j in store.pending_jobs() if j.message == accepted.id]
    at = time.time() if opened_at is None else opened_at
    with store.transaction():
        store.finish_job(
            JobDecision(
                job.id,
                outcome="triggered",
                reason="matched rule",
                rule="new case",
                action="trigger",
                incident_key=key,
            )
        )
        store.save_incident(incident(key, at=at, service=service, last_message=accepted.id))
        payload = {"event_action": "trigger", "dedup_key": key}
        item = store.add_outbox(
            "pagerduty", service, pagerduty_order_key(service, key), payload, job.id
        )
    for result in results or ():
        store.record_outbox(
            [
                OutboxResult(
                    item, result.state, result.response, result.error, result.next_attempt_at
                )
            ]
        )
    return Paged(accepted.id, job.id, item)


def dead(error: str = "HTTP 400: invalid routing key") -> OutboxResult:
    return OutboxResult(0, "dead", response='{"status":"invalid event"}', error=error)


def failed(error: str = "HTTP 503: busy") -> OutboxResult:
    return OutboxResult(0, "pending", error=error, next_attempt_at=time.time() + 3600)


def delivered() -> OutboxResult:
    return OutboxResult(0, "done", response='{"status":"success"}')
