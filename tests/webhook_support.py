"""Helpers for the two-way tests: `gateway serve` with [web], an `[outgoing]` SMTP sink and
Webhooks v3 secrets from the environment; signed PagerDuty webhook bodies and their POSTs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import smtplib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.store import Store, open_store
from gateway.web.pagerduty_webhook import sign
from tests.conftest import free_port, wait_until, write_config
from tests.ops_support import WebGateway, running

OLD_SECRET = "old-subscription-secret-0123456789"
NEW_SECRET = "new-subscription-secret-9876543210"
SECRETS_ENV = {"PD_WEBHOOK_OLD": OLD_SECRET, "PD_WEBHOOK_NEW": NEW_SECRET}
HELPDESK = "support@helpdesk.example"
NOTIFY = (
    'notify = { theme = "incident_update", to = ["support@helpdesk.example"],'
    ' on = ["incident.acknowledged", "incident.resolved", "incident.annotated"] }'
)


def two_way_config(
    directory: Path, pd_url: str, sink_port: int, *, rules_dir: Path | None = None,
    templates_dir: Path | None = None, routing_key: str | None = None,
) -> tuple[Path, int, int]:  # fmt: skip
    """config.toml: PagerDuty stand-in, [web], [outgoing] to the sink, two webhook secrets."""
    port, web_port = free_port(), free_port()
    extra = (
        f'[outgoing]\nhost = "127.0.0.1"\nport = {sink_port}\nfrom = "PagerDuty gateway'
        f' <gw@gateway.test>"\n\n[web]\nlisten = "127.0.0.1:{web_port}"\n'
    )
    kwargs: dict[str, Any] = {"routing_key": routing_key} if routing_key else {}
    config = write_config(
        directory, pd_url=pd_url, smtp_port=port, service_extra=NOTIFY, extra=extra, **kwargs
    )
    text = config.read_text().replace(
        "[pagerduty]\n",
        '[pagerduty]\nwebhook_secret = ["${PD_WEBHOOK_OLD}", "${PD_WEBHOOK_NEW}"]\n',
        1,
    )
    if rules_dir is not None:
        text = text.replace(str(Path(__file__).resolve().parent.parent / "parsing_rules"),
                            rules_dir.as_posix())  # fmt: skip
    if templates_dir is not None:
        text = text.replace(
            (Path(__file__).resolve().parent.parent / "templates").as_posix(),
            templates_dir.as_posix(),
        )
    config.write_text(text)
    return config, port, web_port


@contextlib.contextmanager
def serving(config: Path, port: int, web_port: int) -> Iterator[WebGateway]:
    with running(config, port, web_port) as gateway:
        yield gateway


def event_body(
    event_type: str,
    key: str,
    *,
    pd_id: str = "",
    status: str = "acknowledged",
    urgency: str = "high",
    priority: str = "P1",
    assignee: str = "Tenex Engineer",
    event_id: str | None = None,
) -> bytes:
    """A Webhooks v3 incident event as PagerDuty documents it (developer docs, Overview)."""
    pd_id = pd_id or "P" + hashlib.sha1(key.encode()).hexdigest()[:6].upper()
    data: dict[str, Any] = {
        "id": pd_id,
        "type": "incident",
        "self": f"https://api.pagerduty.com/incidents/{pd_id}",
        "html_url": f"https://acme.pagerduty.com/incidents/{pd_id}",
        "number": 2,
        "status": status,
        "incident_key": key,
        "created_at": "2026-11-30T10:16:27Z",
        "title": key,
        "service": {"id": "PF9KMXH", "summary": "Helpdesk", "type": "service_reference"},
        "assignees": [{"id": "PTUXL6G", "summary": assignee, "type": "user_reference"}],
        "escalation_policy": {"id": "PUS0KTE", "summary": "Default"},
        "priority": {"id": "PSO75BM", "summary": priority, "type": "priority_reference"},
        "urgency": urgency,
        "conference_bridge": None,
        "resolve_reason": None,
    }
    return _event(event_type, data, event_id)


def note_body(pd_id: str, content: str, event_id: str | None = None) -> bytes:
    """`incident.annotated`: its data is an incident_note, naming the incident only by id."""
    data = {
        "incident": {
            "html_url": f"https://acme.pagerduty.com/incidents/{pd_id}",
            "id": pd_id,
            "summary": "A little bump in the road",
            "type": "incident_reference",
        },
        "id": "P2LA89X",
        "content": content,
        "trimmed": False,
        "type": "incident_note",
    }
    return _event("incident.annotated", data, event_id)


def _event(event_type: str, data: dict[str, Any], event_id: str | None) -> bytes:
    event = {
        "event": {
            "id": event_id or str(uuid.uuid4()),
            "event_type": event_type,
            "resource_type": "incident",
            "occurred_at": "2026-11-30T11:45:22.169Z",
            "agent": {"id": "PLH1HKV", "summary": "Tenex Engineer", "type": "user_reference"},
            "client": {"name": "PagerDuty"},
            "data": data,
        }
    }
    return json.dumps(event).encode()


def post(
    gateway: WebGateway,
    body: bytes,
    *,
    signature: str | None = None,
    secret: str = NEW_SECRET,
    webhook_id: str | None = None,
) -> tuple[int, str]:
    """POST /pagerduty/webhook as PagerDuty would (signed with `secret` unless `signature`)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "PagerDuty-Webhook/V3.0",
        "X-Webhook-Id": webhook_id or str(uuid.uuid4()),
        "X-Webhook-Subscription": "PY1OQ1Z",
        "X-PagerDuty-Signature": sign(body, secret) if signature is None else signature,
    }
    if signature == "":
        del headers["X-PagerDuty-Signature"]
    request = urllib.request.Request(
        gateway.base + "/pagerduty/webhook", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def send_mail(gateway: WebGateway, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
        client.sendmail(HELPDESK, ["desk@gateway.example"], raw)


def store_of(directory: Path) -> Store:
    """The gateway's own database (the test reads it; the gateway keeps writing)."""
    return open_store(directory / "data" / "gateway.sqlite3")


def wait_for_incident(store: Store, key: str, **expected: Any):
    def matches():
        incident = store.incident("helpdesk", key)
        if incident is None:
            return None
        ok = all(getattr(incident, k) == v for k, v in expected.items())
        return incident if ok else None

    return wait_until(matches, message=f"incident {key!r} never had {expected}")
