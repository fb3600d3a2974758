"""Outgoing mail as an outbox item: a rendered message plus its envelope, queued durably.

Decisions (helpdesk notifications), `POST /notify/<theme>` and `gateway notify` all queue mail
here; `gateway.delivery.mailer` sends it.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

from gateway.store import DecisionStore
from gateway.themes.render import POLICY, recipients

KIND = "mail"


def mail_payload(msg: EmailMessage, mail_from: str, rcpt_tos: list[str]) -> dict[str, Any]:
    """The outbox payload of one message: envelope plus the serialized message (CRLF, 7-bit)."""
    return {
        "mail_from": mail_from,
        "rcpt_tos": list(rcpt_tos),
        "message": msg.as_string(policy=POLICY),
        "subject": str(msg.get("Subject", "")),  # for `gateway outbox` listings
    }


def envelope_sender(from_addr: str) -> str:
    """The bare address of '[outgoing] from' ('Gateway <gw@x>' -> 'gw@x') for MAIL FROM."""
    return parseaddr(from_addr)[1] or from_addr


def queue_mail(
    store: DecisionStore,
    msg: EmailMessage,
    *,
    mail_from: str,
    rcpt_tos: list[str] | None = None,
    service: str = "-",
    order_key: str | None = None,
    job: int | None = None,
) -> int:
    """Add a message to the outbox (inside the caller's transaction if one is open)."""
    rcpts = rcpt_tos if rcpt_tos is not None else recipients(msg)
    if not rcpts:
        raise ValueError("the message has no recipients")
    key = order_key or f"mail:{msg['Message-ID']}"
    payload = mail_payload(msg, mail_from, rcpts)
    return queue_payload(store, payload, service=service, order_key=key, job=job)


def queue_payload(
    store: DecisionStore,
    payload: dict[str, Any],
    *,
    service: str,
    order_key: str,
    job: int | None = None,
) -> int:
    """Add an already serialized message (`mail_payload`) to the outbox."""
    with store.transaction():
        return store.add_outbox(KIND, service, order_key, payload, job)
