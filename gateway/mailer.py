"""Outgoing mail: rendered messages go through the durable outbox to the `[outgoing]` relay.

A message is queued (`queue_mail`) in the caller's transaction and delivered by an
`OutboxWorker(kind="mail")` whose sender is `MailSender`, so a relay outage delays mail but
never loses it. SMTP answers map onto the outbox's two failure kinds:

    4xx reply, connection refused/reset, timeout, TLS failure  -> TemporaryDeliveryError (retry)
    5xx reply (sender, every recipient, or the data refused)   -> RejectedDeliveryError (dead
                                                                   letter with the reply)
"""

from __future__ import annotations

import ssl
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any

import aiosmtplib

from gateway.config import OutgoingSettings
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.outbox import OutboxWorker, RetryPolicy
from gateway.store import OutboxItem, Store, StoreThread
from gateway.themes import POLICY, recipients

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
    store: Store,
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
    with store.transaction():
        return store.add_outbox(KIND, service, key, mail_payload(msg, mail_from, rcpts), job)


class MailSender:
    """The outbox sender for kind 'mail': one SMTP session per item, errors classified."""

    def __init__(self, settings: OutgoingSettings, *, tls_context: ssl.SSLContext | None = None):
        self.settings = settings
        self.tls_context = tls_context  # tests pass a trustme CA; default: system CAs

    async def __call__(self, item: OutboxItem) -> str:
        payload = item.payload
        try:
            return await self._send(payload["mail_from"], payload["rcpt_tos"], payload["message"])
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise _refused(exc) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc.code, exc.message, type(exc).__name__) from None
        except (aiosmtplib.SMTPException, OSError) as exc:  # timeouts are OSErrors too
            where = f"{self.settings.host}:{self.settings.port}"
            raise TemporaryDeliveryError(f"relay {where}: {type(exc).__name__}: {exc}") from None

    async def _send(self, mail_from: str, rcpt_tos: list[str], message: str) -> str:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=s.password,
            timeout=s.timeout_seconds,
            use_tls=s.security == "tls",
            start_tls=s.security == "starttls",
            validate_certs=s.tls_verify,
            tls_context=self.tls_context if s.security != "none" else None,
        )
        async with client:
            refused, text = await client.sendmail(mail_from, rcpt_tos, message.encode())
        reply = f"250 {text}"  # sendmail returns the text of the (always 250) DATA reply
        if refused:  # some recipients accepted: delivered; keep the refusals in the response
            notes = "; ".join(f"{r}: {code} {text}" for r, (code, text) in refused.items())
            return f"{reply} (refused: {notes})"
        return reply


def _classify(code: int, message: str, what: str) -> Exception:
    text = f"relay answered {code} {message}".strip()
    if 500 <= code < 600:
        return RejectedDeliveryError(f"{what}: {text}", response=f"{code} {message}")
    return TemporaryDeliveryError(f"{what}: {text}")


def _refused(exc: aiosmtplib.SMTPRecipientsRefused) -> Exception:
    """Every recipient refused: temporary if any refusal was (greylisting), else rejected."""
    details = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
    if any(r.code < 500 for r in exc.recipients):
        return TemporaryDeliveryError(f"recipients refused: {details}")
    return RejectedDeliveryError(f"recipients refused: {details}", response=details)


def mail_worker(
    store: StoreThread,
    settings: OutgoingSettings,
    policy: RetryPolicy | None = None,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> OutboxWorker:
    """The outbox worker that delivers queued mail through the relay (service.py runs it)."""
    sender = MailSender(settings, tls_context=tls_context)
    lease = 2 * settings.timeout_seconds + 30  # a session can take several timeouts' worth
    return OutboxWorker(
        store, KIND, sender, policy or RetryPolicy(), concurrency=4, lease_seconds=lease
    )
