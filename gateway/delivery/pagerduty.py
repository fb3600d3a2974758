"""PagerDuty Events API v2: send the event JSON that the decision built (`decide.events`).

The outbox stores events *without* the routing key (it is a secret and may be rotated); the
sender adds the key of the item's service at send time. Status mapping follows the documented
contract: 2xx done, 400 rejected for good, 429 and 5xx (and network trouble) retried.

The sender speaks httpx's transport interface (`httpx.Request` in, `httpx.Response` out, httpx
exceptions) rather than `AsyncClient`: the client's layers (URL and header merging, cookie
jar, auth and redirect flows) did nothing for one fixed JSON POST but cost about a fifth of the
worker's delivery CPU. Production passes `http11.build_transport`; tests pass
`httpx.MockTransport`.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from gateway import __version__
from gateway.decide.events import CLIENT_NAME
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem, OutboxStore

HEADERS = {"User-Agent": f"{CLIENT_NAME}/{__version__}", "Content-Type": "application/json"}


# one encoder for every request: `json.dumps` with options builds a new one per call
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _json(body: dict[str, Any]) -> bytes:
    """The request body as httpx's `json=` would encode it (compact, UTF-8)."""
    return _ENCODE(body).encode()


def slot_name(routing_key: str) -> str:
    """What the store keeps of a rate-limited key: a hash, never the secret itself."""
    return hashlib.sha256(routing_key.encode()).hexdigest()[:32]


class RateBudget:
    """Per routing key at most `per_minute` events a minute, evenly spaced (PagerDuty's
    documented Events API rate is about 120 a minute per key).

    The dispatcher asks it at claim time (`admit`), so an event over the budget stays in the
    outbox, unclaimed and visible as throttled, instead of waiting in memory in front of the
    events claimed after it: among the due heads, in claim order, new cases go first. A 429
    closes the key's budget for its Retry-After (`penalize`). Thread-safe: the claim runs on
    the store's thread.
    """

    def __init__(
        self,
        per_minute: int,
        routing_key: Callable[[str], str | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = 60.0 / per_minute
        self.routing_key = routing_key  # service -> its routing key (None: none configured)
        self.clock = clock
        self.held_back = 0  # due heads the last claim left for later
        self._next: dict[str, float] = {}  # routing key -> when it may send again
        self._lock = threading.Lock()

    def admit(
        self,
        items: list[OutboxItem],
        limit: int | None = None,
        slots: OutboxStore | None = None,
    ) -> list[OutboxItem]:
        """The items that may be sent now, in their order, at most `limit` (a claim's room:
        no slot is spent on an item that would not be claimed); each takes its key's slot,
        here and, with `slots` (the claiming store), in the store, which every other worker
        and node sharing it also asks: the cluster keeps the rate, not each node."""
        with self._lock:
            now = self.clock()
            admitted: list[OutboxItem] = []
            for item in items:
                if limit is not None and len(admitted) >= limit:
                    break
                key = self.routing_key(item.service)
                if key is not None:  # the key it is sent with: its incident's, pinned if any
                    key = str(item.payload.get("routing_key") or key)
                    if self._next.get(key, now) > now:
                        continue
                    self._next[key] = now + self.interval
                    if slots is not None and not slots.take_send_slot(
                        slot_name(key), self.interval
                    ):
                        continue  # another worker took this slot; this one tries for the next
                admitted.append(item)  # without a key it fails at once, costing nothing
            self.held_back = len(items) - len(admitted)
            return admitted

    def penalize(self, routing_key: str, seconds: float) -> None:
        """PagerDuty said 429: send nothing more for this key for `seconds`."""
        with self._lock:
            until = self.clock() + max(seconds, self.interval)
            self._next[routing_key] = max(self._next.get(routing_key, 0.0), until)

    def wait_seconds(self) -> float:
        """How long until a key that held items back may send again (0 if none did)."""
        with self._lock:
            if not self.held_back:
                return 0.0
            now = self.clock()
            waits = [when - now for when in self._next.values() if when > now]
            return min(waits, default=0.0)


class PagerDutySender:
    """Sends outbox items of kind 'pagerduty' to the Events API."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        events_url: str,
        routing_keys: Mapping[str, str],
        *,
        timeout: float = 10.0,
        rate_budget: RateBudget | None = None,
    ) -> None:
        self.transport = transport
        self.timeout = httpx.Timeout(timeout).as_dict()  # connect, read, write (and pool)
        self.rate_budget = rate_budget
        self.reconfigure(events_url, routing_keys)

    def reconfigure(self, events_url: str, routing_keys: Mapping[str, str]) -> None:
        """A reload: items sent from now on use the new URL and keys (keys may be rotated)."""
        self.events_url, self.routing_keys = events_url, routing_keys
        try:
            self._url: httpx.URL | None = httpx.URL(events_url)  # parsed once, not per request
        except httpx.InvalidURL:
            self._url = None  # each attempt says so, and waits for a reload with a good one

    async def __call__(self, item: OutboxItem) -> str:
        configured = self.routing_keys.get(item.service)
        if not configured:
            raise TemporaryDeliveryError(f"service {item.service!r} has no routing_key configured")
        # the key its incident records, pinned when decided
        routing_key = str(item.payload.get("routing_key") or configured)
        if self._url is None:
            raise TemporaryDeliveryError(f"events_url {self.events_url!r} is not a valid URL")
        body = {"routing_key": routing_key, **item.payload}
        request = httpx.Request(
            "POST",
            self._url,
            content=_json(body),
            headers=HEADERS,
            extensions={"timeout": self.timeout},
        )
        try:
            response = await self._exchange(request)
        except httpx.TimeoutException as exc:
            raise TemporaryDeliveryError(f"timeout: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise TemporaryDeliveryError(f"connection error: {exc or type(exc).__name__}") from exc
        if response.status_code == 429 and self.rate_budget is not None:
            self.rate_budget.penalize(routing_key, _retry_after(response) or 1.0)
        return classify_response(response)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        """The whole response, read; the transport's stream is closed whatever happens."""
        response = await self.transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


def classify_response(response: httpx.Response) -> str:
    """Map the Events API answer to done / retry / dead letter."""
    text = response.text[:4000]
    status = response.status_code
    if 200 <= status < 300:
        return text
    if status == 429 or status >= 500 or status in (403, 404, 408):
        raise TemporaryDeliveryError(
            f"HTTP {status}: {text[:200]}", retry_after=_retry_after(response)
        )
    raise RejectedDeliveryError(f"HTTP {status}: {text[:200]}", response=text)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
