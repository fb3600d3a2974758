"""A local stand-in for the parts of PagerDuty's REST API v2 the gateway's rule actions use,
written from PagerDuty's API reference:

* every request: `Authorization: Token token=<token>` (else 401, error code 2006) and
  `Accept: application/vnd.pagerduty+json;version=2`;
* writes (PUT, POST): a `From:` header with a user's email (else 400) and a JSON body;
* `GET /priorities`, `GET /incidents?incident_key=...&statuses[]=...`;
* `PUT /incidents/{id}` (`{"incident": {"type": "incident_reference", ...}}`),
  `POST /incidents/{id}/notes` (`{"note": {"content"}}`),
  `POST /incidents/{id}/responder_requests` (`requester_id`, `message`,
  `responder_request_targets`); an unknown incident id is 404.

Tests script answers ahead of the normal ones (e.g. 429 with Retry-After); every request is
recorded with its method, path, query, headers and body.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.pdserver import Scripted

PRIORITIES = [
    {"id": "PSO75BM", "type": "priority", "name": "P1", "summary": "P1"},
    {"id": "PG8N1DV", "type": "priority", "name": "P2", "summary": "P2"},
]
_INCIDENT = re.compile(r"^/incidents/([A-Z0-9]+)(/notes|/responder_requests)?$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class RestStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.incidents: dict[str, dict[str, Any]] = {}  # id -> incident
        self.requests: list[dict[str, Any]] = []
        self.script: list[Scripted] = []
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> RestStandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_incident(self, key: str, pd_id: str, status: str = "triggered") -> None:
        with self.lock:
            self.incidents[pd_id] = {"id": pd_id, "incident_key": key, "status": status}

    def writes(self, pd_id: str) -> list[dict[str, Any]]:
        """The accepted PUT/POST requests on one incident, in order."""
        with self.lock:
            return [
                r for r in self.requests
                if r["method"] != "GET" and r["path"].startswith(f"/incidents/{pd_id}")
                and 200 <= r["status"] < 300
            ]  # fmt: skip

    def answer(self, method: str, path: str, query: dict, headers: dict, body: bytes):
        """(status, JSON body, extra headers) for one request, as PagerDuty would answer."""
        with self.lock:
            if self.script:
                scripted = self.script.pop(0)
                return scripted.status, scripted.body or "{}", scripted.headers
        if headers.get("authorization") != f"Token token={self.token}":
            return 401, {"error": {"message": "Unauthorized", "code": 2006}}, {}
        if headers.get("accept") != "application/vnd.pagerduty+json;version=2":
            return 406, {"error": {"message": "Not Acceptable"}}, {}
        if method == "GET":
            return self._get(path, query)
        if "@" not in headers.get("from", ""):
            return 400, {"error": {"message": "Requester User Not Found", "code": 2100}}, {}
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {"error": {"message": "Invalid Input Provided", "code": 2001}}, {}
        return self._write(method, path, data)

    def _get(self, path: str, query: dict) -> tuple[int, Any, dict]:
        if path == "/priorities":
            return 200, {"priorities": PRIORITIES, "limit": 25, "offset": 0, "more": False}, {}
        if path == "/incidents":
            keys = query.get("incident_key", [])
            statuses = query.get("statuses[]") or ["triggered", "acknowledged", "resolved"]
            with self.lock:
                found = [i for i in self.incidents.values()
                         if i["incident_key"] in keys and i["status"] in statuses]  # fmt: skip
            return 200, {"incidents": found, "limit": 25, "offset": 0, "more": False}, {}
        return 404, {"error": {"message": "Not Found", "code": 2100}}, {}

    def _write(self, method: str, path: str, data: Any) -> tuple[int, Any, dict]:
        match = _INCIDENT.match(path)
        if not match or match.group(1) not in self.incidents:
            return 404, {"error": {"message": "Incident Not Found", "code": 2100}}, {}
        pd_id, what = match.groups()
        if method == "PUT" and what is None:
            update = data.get("incident") if isinstance(data, dict) else None
            if not isinstance(update, dict) or update.get("type") != "incident_reference":
                return 400, {"error": {"message": "Invalid Input Provided", "code": 2001}}, {}
            return 200, {"incident": {**self.incidents[pd_id], **update}}, {}
        if method == "POST" and what == "/notes":
            note = data.get("note") if isinstance(data, dict) else None
            if not isinstance(note, dict) or not note.get("content"):
                return 400, {"error": {"message": "Invalid Input Provided", "code": 2001}}, {}
            return 201, {"note": {"id": "PWL7QXS", "content": note["content"]}}, {}
        if method == "POST" and what == "/responder_requests":
            needed = ("requester_id", "message", "responder_request_targets")
            if not isinstance(data, dict) or not all(data.get(k) for k in needed):
                return 400, {"error": {"message": "Invalid Input Provided", "code": 2001}}, {}
            return 200, {"responder_request": {"incident": {"id": pd_id}, **data}}, {}
        return 405, {"error": {"message": "Method Not Allowed"}}, {}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, answer, extra = stand_in.answer(
                    self.command, parts.path, query, headers, body
                )
                text = answer if isinstance(answer, str) else json.dumps(answer)
                with stand_in.lock:
                    stand_in.requests.append({
                        "method": self.command, "path": parts.path, "query": query,
                        "headers": headers, "body": json.loads(body) if body else None,
                        "status": status,
                    })  # fmt: skip
                payload = text.encode()
                head = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
                        f"Content-Length: {len(payload)}",
                        *(f"{k}: {v}" for k, v in extra.items())]  # fmt: skip
                # one write: headers and body together (pitfalls.md: Nagle + delayed ACK)
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)

            do_GET = do_PUT = do_POST = _handle

        return Handler
