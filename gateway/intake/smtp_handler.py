"""The SMTP business handler: aiosmtpd hooks that route, check and hand mail to the spool.

As in aiosmtpd's own handlers, the hooks are async and return the SMTP reply; they never write
to the socket. Recipients are routed to services at RCPT (unknown ones get 550 there, not a
bounce later), and DATA hands the raw bytes to the spool writer: its 250 is sent only after the
spool commit returned (DESIGN.md "Acceptance semantics"); our own failure is 451, never 5xx.
The protocol session (`smtp_session`) and the sockets (`smtp_listener`) live elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime
from fnmatch import fnmatchcase
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.config import ServiceSettings
from gateway.errors import StoreError
from gateway.intake.flow import IntakePacing
from gateway.intake.spool import SpoolWriter, incoming
from gateway.mail.addresses import envelope_address, sender_matches
from gateway.store import Accepted, IncomingMail

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"
REPLY_MAIL_OK = "250 2.1.0 Ok"
REPLY_RCPT_OK = "250 2.1.5 Ok"
REPLY_NO_SUCH_SERVICE = "550 5.1.1 <{address}>: Recipient address rejected: no such service"
REPLY_SENDER_NOT_ALLOWED = "550 5.7.1 Sender not allowed for <{address}>"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_TEMPFAIL = "451 4.3.0 Temporary internal error, try again later"

MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
_UNSAFE_TRACE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_UNSAFE_ADDRESS = re.compile(r"[<>\s]")


# -- routing (pure functions) -------------------------------------------------------------------


def route_recipient(address: str, services: Sequence[ServiceSettings]) -> str | None:
    """The service an RCPT address belongs to, or None.

    Exact addresses win over `*` patterns (fnmatch, case-insensitive), and the address as given
    wins over its plus-less form (`desk+tag@x` is also tried as `desk@x`), so an operator can
    route a tagged address elsewhere by listing it explicitly.
    """
    for candidate in _candidates(address.strip().lower()):
        for service in services:
            if candidate in (a.lower() for a in service.addresses):
                return service.name
        for service in services:
            if any(_is_pattern(p) and fnmatchcase(candidate, p.lower()) for p in service.addresses):
                return service.name
    return None


def _candidates(address: str) -> list[str]:
    local, at, domain = address.rpartition("@")
    base = local.split("+", 1)[0]
    if at and base and base != local:
        return [address, f"{base}@{domain}"]
    return [address]


def _is_pattern(address: str) -> bool:
    return any(c in address for c in "*?[")


def sender_allowed(mail_from: str, patterns: Iterable[str]) -> bool:
    """True if the envelope sender is one plain address matching one of `patterns`; no
    patterns allows everyone. `"x@evil.example"@trusted.example` is not an address of
    trusted.example: anything but one plain address is refused (`gateway.mail.addresses`)."""
    patterns = tuple(patterns)
    return not patterns or sender_matches(envelope_address(mail_from), patterns)


def checks_envelope_at_rcpt(service: ServiceSettings) -> bool:
    """Whether RCPT refuses a disallowed envelope sender for this service (550 5.7.1); with
    `allowed_senders_check = "header"` only the From is checked, at decision time."""
    return bool(service.allowed_senders) and service.allowed_senders_check != "header"


# -- trace header -------------------------------------------------------------------------------


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    by: str,
    protocol: str,
    recipients: Sequence[str],
    when: datetime | None = None,
) -> bytes:
    """An RFC 5321 §4.4 `Received:` line; `for <rcpt>` only for one recipient (no address leaks)."""
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    helo_text = _UNSAFE_TRACE.sub("?", helo or "")[:255] or "unknown"
    lines = [f"Received: from {helo_text} ([{ip}])", f"\tby {by} with {protocol}"]
    if len(recipients) == 1:
        lines.append(f"\tfor <{_UNSAFE_ADDRESS.sub('', recipients[0])}>")
    lines[-1] += "; " + (format_datetime(when) if when else _now_rfc5322())
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


_date_cache: tuple[int, str] = (0, "")


def _now_rfc5322() -> str:
    """The current date for trace headers, formatted once a second instead of once a mail."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(datetime.now().astimezone()))
    return _date_cache[1]


def format_peer(peer: Any) -> str:
    """`ip:port`, with brackets for IPv6; anything else (unix sockets) as text."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "")


def envelope_sender(envelope: Envelope) -> str:
    """Envelope sender with the null sender `<>` of bounces as ''."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


# -- business hooks -----------------------------------------------------------------------------


class GatewayHandler:
    """aiosmtpd hooks: RCPT routing and sender policy, DATA into the durable spool.

    No attribute may be named `auth_*`: aiosmtpd offers every such handler member as an AUTH
    mechanism.
    """

    def __init__(
        self,
        services: Sequence[ServiceSettings],
        spool: SpoolWriter,
        *,
        offer_auth: bool,
        pacing: IntakePacing | None = None,
    ) -> None:
        self.services = tuple(services)
        self.spool = spool
        self.pacing = pacing
        self.offer_auth = offer_auth
        self._by_name = {s.name: s for s in self.services}
        self._routes: dict[str, str | None] = {}  # a handler lives until the next reload

    def route(self, address: str) -> str | None:
        """`route_recipient`, memoised: helpdesks send to the same few addresses all day."""
        try:
            return self._routes[address]
        except KeyError:
            if len(self._routes) > 10_000:
                self._routes.clear()
            name = self._routes[address] = route_recipient(address, self.services)
            return name

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to the hook when one exists
        if not self.offer_auth:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        # RFC 2920: aiosmtpd reads commands one by one from its buffer, so a client may send
        # MAIL, RCPT and DATA at once (as Postfix does when offered): two round trips per mail
        # instead of four, which is what limits a remote helpdesk's rate per connection
        return [*responses[:-1], "250-PIPELINING", responses[-1]]  # ([-1] is "250 HELP")

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.pacing is not None:
            await self.pacing.admit()  # a new transaction waits while decisions lag behind
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return REPLY_MAIL_OK

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._check_recipient(envelope, address)
        if reply is not None:
            log.info(
                "smtp %s: from=<%s> rcpt <%s> rejected: %s",
                format_peer(session.peer),
                envelope_sender(envelope),
                address,
                reply,
            )
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return REPLY_RCPT_OK

    def _check_recipient(self, envelope: Envelope, address: str) -> str | None:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return REPLY_TOO_MANY_RECIPIENTS
        name = self.route(address)
        if name is None:
            return REPLY_NO_SUCH_SERVICE.format(address=address)
        service = self._by_name[name]
        if checks_envelope_at_rcpt(service) and not sender_allowed(
            envelope_sender(envelope), service.allowed_senders
        ):
            return REPLY_SENDER_NOT_ALLOWED.format(address=address)
        return None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        try:
            accepted = await _durably(self.spool, self._incoming(session, envelope, raw))
        except StoreError as exc:
            log.error("%s -> 451: spool commit failed: %s", _where(session, envelope, raw), exc)
            return REPLY_TEMPFAIL
        except Exception:
            log.exception("%s -> 451: internal error", _where(session, envelope, raw))
            return REPLY_TEMPFAIL
        if self.pacing is not None and accepted.duplicate_of is None:
            self.pacing.accepted()
        if accepted.duplicate_of is not None:  # never reaches the worker: say it here
            where = _where(session, envelope, raw)
            log.info(
                "%s -> 250 queued as %s (duplicate of %s, not processed again)",
                where,
                accepted.id,
                accepted.duplicate_of,
            )
        elif log.isEnabledFor(logging.DEBUG):
            # The worker logs the one info line per message (id, source, sender, rule,
            # outcome); at info level this second line cost a fifth of the listener's speed.
            log.debug("%s -> 250 queued as %s", _where(session, envelope, raw), accepted.id)
        return REPLY_QUEUED.format(id=accepted.id)

    def _incoming(
        self, session: Session, envelope: Envelope, raw: bytes | bytearray
    ) -> IncomingMail:
        """The spool record. The session put its Received: line in front of the message while
        reading it (no second copy of a big mail); the fingerprint skips that line, so a
        redelivery (new Received line, new date) is still recognised as a duplicate."""
        rcpts = tuple(envelope.rcpt_tos)
        return incoming(
            raw,
            source="smtp",
            services=tuple(dict.fromkeys(n for n in map(self.route, rcpts) if n)),
            mail_from=envelope_sender(envelope),
            rcpt_tos=rcpts,
            peer=format_peer(session.peer),
            trace_length=getattr(envelope, "trace_length", 0),
        )


def _where(session: Session, envelope: Envelope, raw: bytes | bytearray) -> str:
    return (
        f"smtp {format_peer(session.peer)}: from=<{envelope_sender(envelope)}> "
        f"to={','.join(envelope.rcpt_tos)} size={len(raw)}"
    )


async def _durably(spool: SpoolWriter, mail: IncomingMail) -> Accepted:
    """Await the spool commit without ever cancelling it.

    A client that disconnects cancels the session task; the commit still has to finish (the
    writer thread owns the request), so it is shielded and its outcome consumed either way.
    (`SpoolWriter.accept` gives a future, which `ensure_future` passes through as it is.)
    """
    task = asyncio.ensure_future(spool.accept(mail))
    task.add_done_callback(_consume_outcome)
    return await asyncio.shield(task)


def _consume_outcome(task: asyncio.Future[Accepted]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("spool commit of an abandoned session failed: %s", task.exception())
