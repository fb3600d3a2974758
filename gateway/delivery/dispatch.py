"""Builds the outbox workers (PagerDuty events, mail) from the config, for serve and the CLI."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.config import Config
from gateway.delivery import http11, mailer, pagerduty_rest
from gateway.delivery.outbox import Dispatcher, RetryPolicy
from gateway.delivery.pagerduty import PagerDutySender, RateBudget
from gateway.store import StoreThread


def retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(give_up_after=config.pagerduty.max_retry_hours * 3600)


def pagerduty_transport(config: Config) -> httpx.AsyncBaseTransport:
    """One long-lived HTTP transport per process: keep-alive connections to the Events API."""
    return http11.build_transport(config.pagerduty.events_url)


def routing_keys(config: Config) -> dict[str, str]:
    """Service name -> routing key; services without one keep their events local."""
    return {s.name: s.routing_key for s in config.services if s.routing_key}


class Deliveries:
    """One process's outbox workers and their senders, which a reload reconfigures.

    The HTTP timeout, the rate limit and whether mail is sent at all are fixed when this is
    built (a restart applies them); routing keys, the events URL and the relay settings follow
    `reconfigure`.
    """

    def __init__(
        self, store: StoreThread, transport: httpx.AsyncBaseTransport, config: Config
    ) -> None:
        pd = config.pagerduty
        budget = None
        if pd.rate_limit_per_minute:  # per routing key, applied when items are claimed
            budget = RateBudget(
                pd.rate_limit_per_minute, lambda s: self.pagerduty.routing_keys.get(s)
            )
        self.pagerduty = PagerDutySender(
            transport,
            pd.events_url,
            routing_keys(config),
            timeout=pd.timeout_seconds,
            rate_budget=budget,
        )
        policy = retry_policy(config)
        # the lease outlives any one attempt (the HTTP timeout), so no item is sent twice at once
        lease = 2 * pd.timeout_seconds + 5
        self.dispatchers = [
            Dispatcher(
                store, "pagerduty", self.pagerduty, policy, lease_seconds=lease, throttle=budget
            )
        ]
        self.rest: pagerduty_rest.PagerDutyRestSender | None = None
        if pd.api_token:  # REST actions of rules (issue 14): their own kind and sender
            self.rest = pagerduty_rest.PagerDutyRestSender(
                transport,
                pd.api_url,
                pd.api_token,
                from_email=pd.api_from,
                requester_id=pd.api_requester_id,
                timeout=pd.timeout_seconds,
            )
            # PagerDuty limits REST calls per token: one budget for the kind, at claim time
            calls = RateBudget(pd.api_rate_limit_per_minute, lambda _service: "rest-api")
            self.dispatchers.append(
                Dispatcher(
                    store,
                    pagerduty_rest.KIND,
                    self.rest,
                    policy,
                    lease_seconds=lease,
                    throttle=calls,
                )
            )
        self.mail = mailer.MailSender(config.outgoing) if config.outgoing else None
        if self.mail is not None:
            self.dispatchers.append(mailer.dispatcher_for(store, self.mail, policy))

    def reconfigure(self, config: Config) -> None:
        self.pagerduty.reconfigure(config.pagerduty.events_url, routing_keys(config))
        if self.rest is not None and config.pagerduty.api_token:  # a rotated token or user
            self.rest.reconfigure(config.pagerduty)
        if self.mail is not None and config.outgoing is not None:
            self.mail.reconfigure(config.outgoing)

    def wake(self) -> None:
        """Thread-safe: items were queued (or re-queued)."""
        for dispatcher in self.dispatchers:
            dispatcher.wake()

    def leave_new_items(self, others: bool) -> None:
        """Thread-safe: see `Dispatcher.leave_new_items`."""
        for dispatcher in self.dispatchers:
            dispatcher.leave_new_items(others)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop`, then let the attempts in flight finish."""
        await asyncio.gather(*(d.run(stop) for d in self.dispatchers))

    async def run_until_idle(self, deadline: float) -> None:
        await asyncio.gather(*(d.run_until_idle(deadline) for d in self.dispatchers))


async def deliver_due(config: Config, seconds: float) -> None:
    """One-shot delivery of whatever is due (ingest, notify, `outbox flush`)."""
    store = StoreThread(config.store_location, "delivery")
    deadline = time.time() + seconds
    try:
        async with pagerduty_transport(config) as transport:
            await Deliveries(store, transport, config).run_until_idle(deadline)
    finally:
        store.close()
