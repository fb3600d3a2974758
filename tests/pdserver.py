"""A small local HTTP server that follows the PagerDuty Events API v2 contract.

It validates events the way PagerDuty documents (routing key, action, dedup_key, payload fields)
and answers 202 / 400 like the real service; tests can script failures (500s, 429 with
Retry-After) ahead of the normal answers. Every accepted event is recorded in order.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SEVERITIES = ("critical", "error", "warning", "info")


@dataclass
class Scripted:
    status: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def validate_event(event: Any) -> str | None:
    """PagerDuty's checks, as documented; returns an error message or None."""
    if not isinstance(event, dict):
        return "Event object is invalid"
    key = event.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        return "'routing_key' is invalid"
    action = event.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        return "'event_action' is missing or blank"
    dedup = event.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
        return "'dedup_key' must be a string of at most 255 characters"
    if action != "trigger":
        return None if dedup else "'dedup_key' is required for acknowledge and resolve"
    payload = event.get("payload")
    if not isinstance(payload, dict):
        return "'payload' is missing"
    if not payload.get("summary") or len(payload["summary"]) > 1024:
        return "'payload.summary' is missing or too long"
    if not payload.get("source"):
        return "'payload.source' is missing or blank"
    if payload.get("severity") not in SEVERITIES:
        return "'payload.severity' is invalid"
    return None


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # http.server's backlog of 5 drops SYNs under concurrent load
    daemon_threads = True


class PagerDutyStandIn:
    """Start with `start()`; `url` is the events endpoint; `events` the accepted ones."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []  # every request, accepted or not
        self.script: list[Scripted] = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.server = _Server(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v2/enqueue"

    def start(self) -> PagerDutyStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, count: int, status: int = 500, **headers: str) -> None:
        with self.lock:
            self.script.extend(
                Scripted(status, '{"status":"error"}', headers) for _ in range(count)
            )

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Block until `count` events were accepted (or fail the test at the deadline)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} events, got {len(self.events)}")
                self.cond.wait(left)
            return list(self.events)

    def _answer(self, body: bytes, peer: Any = None) -> tuple[int, str, dict[str, str]]:
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        with self.cond:
            self.requests.append({"at": time.time(), "event": event, "peer": peer})
            if self.script:
                scripted = self.script.pop(0)
                return scripted.status, scripted.body, scripted.headers
            error = validate_event(event)
            if error:
                body = {
                    "status": "invalid event",
                    "message": "Event object is invalid",
                    "errors": [error],
                }
                return 400, json.dumps(body), {}
            self.events.append(event)
            self.cond.notify_all()
        answer = {
            "status": "success",
            "message": "Event processed",
            "dedup_key": event.get("dedup_key"),
        }
        return 202, json.dumps(answer), {}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real API
            disable_nagle_algorithm = True  # headers and body are separate writes

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                status, text, headers = standin._answer(
                    self.rfile.read(length), self.client_address
                )
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
