"""PagerDuty REST API actions (outbox kind `pagerduty_rest`): what a mail rule asked the
Events API could not do, done with `[pagerduty] api_token`.

Requests follow PagerDuty's REST API v2 reference: `Authorization: Token token=<api_token>`,
`Accept: application/vnd.pagerduty+json;version=2`, and for writes a `From:` header with the
email of a user of the account. The incident is the item's `pd_id` (the mirror knew it from a
webhook) or found with `GET /incidents?incident_key=<dedup key>` among open incidents; none
yet (the trigger is still on its way through PagerDuty) is a temporary failure, retried with
the outbox's backoff. Answers map like the Events API's (`pagerduty.classify_response`): 2xx
done, 429 (honouring Retry-After) / 5xx / 404 retried, other 4xx a dead letter.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from gateway.config import PagerDutySettings
from gateway.decide.rest_actions import KIND
from gateway.delivery.pagerduty import HEADERS, classify_response
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem

ACCEPT = "application/vnd.pagerduty+json;version=2"
OPEN = ("triggered", "acknowledged")

__all__ = ["KIND", "PagerDutyRestSender", "rest_request"]


def _target(value: str) -> dict[str, str]:
    kind, _, ident = value.partition(":")
    return {"id": ident, "type": f"{kind}_reference"}


def rest_request(
    action: str, value: str, incident: str, *, priority_id: str = "", requester_id: str = ""
) -> tuple[str, str, dict[str, Any]]:
    """(method, path, JSON body) of one action on incident `incident`."""
    path = f"/incidents/{incident}"
    update: dict[str, Any] = {"id": incident, "type": "incident_reference"}
    if action == "set_priority":
        update["priority"] = {"id": priority_id, "type": "priority_reference"}
    elif action == "set_urgency":
        update["urgency"] = value
    elif action == "reassign":
        target = _target(value)
        if target["type"] == "user_reference":
            update["assignments"] = [{"assignee": target}]
        else:
            update["escalation_policy"] = target
    elif action == "add_note":
        return "POST", f"{path}/notes", {"note": {"content": value}}
    elif action == "add_responders":
        body = {
            "requester_id": requester_id,
            "message": "Please help with this incident (requested by the email gateway's rules)",
            "responder_request_targets": [{"responder_request_target": _target(value)}],
        }
        return "POST", f"{path}/responder_requests", body
    else:
        raise RejectedDeliveryError(f"unknown REST action {action!r}")
    return "PUT", path, {"incident": update}


class PagerDutyRestSender:
    """Sends `pagerduty_rest` items; one per process, like the Events API sender."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        api_url: str,
        token: str,
        *,
        from_email: str = "",
        requester_id: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.transport = transport
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.from_email = from_email
        self.requester_id = requester_id
        self.timeout = httpx.Timeout(timeout).as_dict()
        self._priorities: dict[str, str] = {}  # name (folded) -> id, fetched once

    def reconfigure(self, settings: PagerDutySettings) -> None:
        """A reload: the token, URL and user may change (adding the token needs a restart)."""
        self.api_url = settings.api_url.rstrip("/")
        self.token, self.from_email = settings.api_token, settings.api_from
        self.requester_id = settings.api_requester_id

    async def __call__(self, item: OutboxItem) -> str:
        payload = item.payload
        action, value = str(payload.get("action", "")), str(payload.get("value", ""))
        incident = str(payload.get("pd_id") or "") or await self._find(str(payload["incident_key"]))
        priority_id = await self._priority_id(value) if action == "set_priority" else ""
        if action == "add_responders" and not self.requester_id:
            raise RejectedDeliveryError("add_responders needs [pagerduty] api_requester_id")
        method, path, body = rest_request(
            action, value, incident, priority_id=priority_id, requester_id=self.requester_id
        )
        response = await self._call(method, path, body)
        return f"{action} on {incident}: {classify_response(response)}"

    async def _find(self, key: str) -> str:
        """The id of the open incident with this dedup key (PagerDuty's `incident_key`)."""
        params = [("incident_key", key), *(("statuses[]", s) for s in OPEN)]
        found = _json(await self._call("GET", "/incidents", None, params))
        incidents = found.get("incidents") if isinstance(found, dict) else None
        if not incidents:
            raise TemporaryDeliveryError(f"no open incident with incident_key {key!r} yet")
        return str(incidents[0].get("id", ""))

    async def _priority_id(self, name: str) -> str:
        if name.casefold() not in self._priorities:
            listed = _json(await self._call("GET", "/priorities", None))
            for priority in listed.get("priorities", []) if isinstance(listed, dict) else []:
                self._priorities[str(priority.get("name", "")).casefold()] = str(priority["id"])
        found = self._priorities.get(name.casefold())
        if not found:
            known = ", ".join(sorted(self._priorities)) or "none"
            raise RejectedDeliveryError(f"no priority named {name!r} (known: {known})")
        return found

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        params: list[tuple[str, str]] | None = None,
    ) -> httpx.Response:
        headers = {**HEADERS, "Accept": ACCEPT, "Authorization": f"Token token={self.token}"}
        if method != "GET" and self.from_email:
            headers["From"] = self.from_email
        content = json.dumps(body).encode() if body is not None else b""
        url = httpx.URL(self.api_url + path, params=params)
        request = httpx.Request(
            method, url, content=content, headers=headers, extensions={"timeout": self.timeout}
        )
        try:
            response = await self.transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise TemporaryDeliveryError(f"timeout: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise TemporaryDeliveryError(f"connection error: {exc or type(exc).__name__}") from exc
        if method == "GET" and not 200 <= response.status_code < 300:
            classify_response(response)  # raises: retry, or a dead letter
        return response


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise TemporaryDeliveryError(f"not JSON from {response.request.url}") from None
