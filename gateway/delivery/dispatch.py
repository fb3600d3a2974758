"""Builds the outbox workers (PagerDuty events, mail) from the config, for serve and the CLI."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.config import Config
from gateway.delivery import mailer
from gateway.delivery.outbox import Dispatcher, RetryPolicy
from gateway.delivery.pagerduty import PagerDutySender, RateLimiter
from gateway.store import StoreThread


def retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(give_up_after=config.pagerduty.max_retry_hours * 3600)


def pagerduty_dispatcher(
    store: StoreThread, client: httpx.AsyncClient, config: Config
) -> Dispatcher:
    pd = config.pagerduty
    routing_keys = {s.name: s.routing_key for s in config.services if s.routing_key}
    limiter = RateLimiter(pd.rate_limit_per_minute) if pd.rate_limit_per_minute else None
    sender = PagerDutySender(client, pd.events_url, routing_keys, rate_limiter=limiter)
    # the lease outlives any one attempt (the HTTP timeout), so no item is sent twice at once
    lease = 2 * pd.timeout_seconds + 5
    return Dispatcher(store, "pagerduty", sender, retry_policy(config), lease_seconds=lease)


def mail_dispatcher(store: StoreThread, config: Config) -> Dispatcher | None:
    if config.outgoing is None:
        return None
    return mailer.mail_dispatcher(store, config.outgoing, retry_policy(config))


async def deliver_due(config: Config, seconds: float) -> None:
    """One-shot delivery of whatever is due (ingest, notify, `outbox flush`)."""
    store = StoreThread(config.db_path, "delivery")
    deadline = time.time() + seconds
    try:
        async with httpx.AsyncClient(timeout=config.pagerduty.timeout_seconds) as client:
            workers = [pagerduty_dispatcher(store, client, config), mail_dispatcher(store, config)]
            await asyncio.gather(*(w.run_until_idle(deadline) for w in workers if w))
    finally:
        store.close()
