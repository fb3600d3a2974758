"""Outgoing mail: rendered messages go through the durable outbox to the `[outgoing]` relay.

A message is queued (`gateway.decide.outgoing_mail.queue_mail`) in the caller's transaction and delivered by an
`Dispatcher(kind="mail")` whose sender is `MailSender`, so a relay outage delays mail but
never loses it. SMTP answers map onto the outbox's two failure kinds:

    4xx reply, connection refused/reset, timeout, TLS failure  -> TemporaryDeliveryError (retry)
    5xx reply (sender, every recipient, or the data refused)   -> RejectedDeliveryError (dead
                                                                   letter with the reply)
"""

from __future__ import annotations

import ssl

import aiosmtplib

from gateway.config import OutgoingSettings
from gateway.decide.outgoing_mail import KIND
from gateway.delivery.outbox import Dispatcher, RetryPolicy
from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem, StoreThread


class MailSender:
    """The outbox sender for kind 'mail': one SMTP session per item, errors classified."""

    def __init__(self, settings: OutgoingSettings, *, tls_context: ssl.SSLContext | None = None):
        self.settings = settings
        self.tls_context = tls_context  # tests pass a trustme CA; default: system CAs

    def reconfigure(self, settings: OutgoingSettings) -> None:
        """A reload: sessions opened from now on use the new relay settings (password rotation)."""
        self.settings = settings

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


def mail_dispatcher(
    store: StoreThread,
    settings: OutgoingSettings,
    policy: RetryPolicy | None = None,
    *,
    tls_context: ssl.SSLContext | None = None,
) -> Dispatcher:
    """The outbox worker that delivers queued mail through the relay."""
    return dispatcher_for(store, MailSender(settings, tls_context=tls_context), policy)


def dispatcher_for(
    store: StoreThread, sender: MailSender, policy: RetryPolicy | None = None
) -> Dispatcher:
    """The outbox worker for `sender` (whose owner may reconfigure it on a reload)."""
    lease = 2 * sender.settings.timeout_seconds + 30  # a session can take several timeouts
    return Dispatcher(
        store, KIND, sender, policy or RetryPolicy(), concurrency=4, lease_seconds=lease
    )
