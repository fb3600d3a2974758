"""The SMTP listener: aiosmtpd on the service's own event loop, hardened for a public MX.

Two layers, as in aiosmtpd itself:

* `GatewayHandler` holds the business hooks: recipients are routed to services at RCPT (unknown
  ones get 550 there, not a bounce later) and DATA hands the raw bytes to `intake`; its 250 is
  sent only after the spool commit returned (DESIGN.md "Acceptance semantics").
* `GatewaySMTP` (an `aiosmtpd.smtp.SMTP` subclass) fixes protocol defaults that do not suit a
  gateway: a connection cap answered before the greeting, SIZE enforced at MAIL with RFC 3463
  codes, a DATA reader that accepts long lines and stops buffering at the size limit, password
  checks off the event loop, and 451 (never a traceback, never a 5xx) for our own faults.

`SmtpListener` binds the configured addresses and shuts down gracefully: idle sessions are told
421 at once, sessions in a transaction may finish (their 250 still waits for the commit).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import logging
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.utils import format_datetime
from fnmatch import fnmatchcase
from typing import Any

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    Envelope,
    Session,
    TLSSetupException,
    syntax,
)

from gateway.config import ServiceSettings, SmtpSettings, split_hostport
from gateway.errors import StoreError
from gateway.intake import spool as intake
from gateway.intake.smtp_auth import AuthMechanisms, UsersFile
from gateway.intake.spool import SpoolWriter
from gateway.store import Accepted

log = logging.getLogger(__name__)

REPLY_QUEUED = "250 2.0.0 Ok: queued as {id}"
REPLY_MAIL_OK = "250 2.1.0 Ok"
REPLY_RCPT_OK = "250 2.1.5 Ok"
REPLY_NO_SUCH_SERVICE = "550 5.1.1 <{address}>: Recipient address rejected: no such service"
REPLY_SENDER_NOT_ALLOWED = "550 5.7.1 Sender not allowed for <{address}>"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_TEMPFAIL = "451 4.3.0 Temporary internal error, try again later"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"

MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8: at least 100 must be accepted
# StreamReader chunk limit: DATA lines longer than this arrive in pieces and are still accepted.
READ_CHUNK_LIMIT = 64 * 1024
LISTEN_BACKLOG = 1024
REFUSAL_LOG_INTERVAL = 60.0
_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)(?=\s|$)", re.IGNORECASE)
_UNSAFE_TRACE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_UNSAFE_ADDRESS = re.compile(r"[<>\s]")
# <local@domain> with a plain dot-atom local part and a hostname: no quoting, comments or routes
_SIMPLE_PATH = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@([A-Za-z0-9.-]+)>\s*(.*)", re.DOTALL
)


# -- aiosmtpd introspection, cached ---------------------------------------------------------------


class _ClassCachedInspection:
    """aiosmtpd's `SMTP.__init__` introspects the handler and the session on every connection
    (`inspect.getmembers`, `dir`, `inspect.signature`): measured, half the listener's CPU per
    connection. The answers depend only on the classes, so they are computed once per class.
    `getmembers` is used there only to collect `auth_*` members, and answers exactly those."""

    def __init__(self) -> None:
        self._names: dict[type, list[str]] = {}
        self._signatures: dict[Any, inspect.Signature] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)

    def dir(self, obj: Any = None) -> list[str]:
        """The class's attribute names (cached) plus the instance's own, like `dir(obj)`."""
        if obj is None:
            raise TypeError("dir() without an argument is not supported here")
        kind = type(obj)
        names = self._names.get(kind)
        if names is None:
            names = self._names[kind] = builtins.dir(kind)
        own = getattr(obj, "__dict__", None)
        return [*names, *own] if own else names

    def getmembers(self, obj: Any, predicate: Any = None) -> list[tuple[str, Any]]:
        if predicate is not None:
            return inspect.getmembers(obj, predicate)
        return [(n, getattr(obj, n)) for n in self.dir(obj) if n.startswith("auth_")]

    def signature(self, obj: Any) -> inspect.Signature:
        key = (getattr(obj, "__func__", obj), hasattr(obj, "__self__"))
        found = self._signatures.get(key)
        if found is None:
            found = self._signatures[key] = inspect.signature(obj)
        return found


def _install_cached_inspection() -> None:
    cached = _ClassCachedInspection()
    aiosmtpd_smtp.inspect = cached  # type: ignore[assignment]
    aiosmtpd_smtp.dir = cached.dir  # type: ignore[attr-defined]  # shadows the builtin there


_install_cached_inspection()


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
    """True if the envelope sender matches one of `patterns`; no patterns allows everyone."""
    patterns = tuple(patterns)
    sender = mail_from.lower()
    return not patterns or any(fnmatchcase(sender, p.lower()) for p in patterns)


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


def _sender(envelope: Envelope) -> str:
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
        self, services: Sequence[ServiceSettings], spool: SpoolWriter, *, offer_auth: bool
    ) -> None:
        self.services = tuple(services)
        self.spool = spool
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
        if self.offer_auth:
            return responses
        return [r for r in responses if not r.startswith("250-AUTH")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
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
                _sender(envelope),
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
        if not sender_allowed(_sender(envelope), self._by_name[name].allowed_senders):
            return REPLY_SENDER_NOT_ALLOWED.format(address=address)
        return None

    async def handle_DATA(self, server: GatewaySMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        try:
            accepted = await _durably(self.spool, self._incoming(server, session, envelope, raw))
        except StoreError as exc:
            log.error("%s -> 451: spool commit failed: %s", _where(session, envelope, raw), exc)
            return REPLY_TEMPFAIL
        except Exception:
            log.exception("%s -> 451: internal error", _where(session, envelope, raw))
            return REPLY_TEMPFAIL
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
        self, server: GatewaySMTP, session: Session, envelope: Envelope, raw: bytes | bytearray
    ) -> intake.IncomingMail:
        """The spool record. The session put its Received: line in front of the message while
        reading it (no second copy of a big mail); the fingerprint skips that line, so a
        redelivery (new Received line, new date) is still recognised as a duplicate."""
        rcpts = tuple(envelope.rcpt_tos)
        return intake.incoming(
            raw,
            source="smtp",
            services=tuple(dict.fromkeys(n for n in map(self.route, rcpts) if n)),
            mail_from=_sender(envelope),
            rcpt_tos=rcpts,
            peer=format_peer(session.peer),
            trace_length=getattr(envelope, "trace_length", 0),
        )


def _where(session: Session, envelope: Envelope, raw: bytes | bytearray) -> str:
    return (
        f"smtp {format_peer(session.peer)}: from=<{_sender(envelope)}> "
        f"to={','.join(envelope.rcpt_tos)} size={len(raw)}"
    )


async def _durably(spool: SpoolWriter, mail: intake.IncomingMail) -> Accepted:
    """Await the spool commit without ever cancelling it.

    A client that disconnects cancels the session task; the commit still has to finish (the
    writer thread owns the request), so it is shielded and its outcome consumed either way.
    """
    task = asyncio.ensure_future(spool.accept(mail))
    task.add_done_callback(_consume_outcome)
    return await asyncio.shield(task)


def _consume_outcome(task: asyncio.Future[Accepted]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("spool commit of an abandoned session failed: %s", task.exception())


# -- protocol -----------------------------------------------------------------------------------


class GatewaySMTP(AuthMechanisms, SMTP):
    """One SMTP session, with the gateway's limits and replies (see the module docstring)."""

    line_length_limit = READ_CHUNK_LIMIT  # used by SMTP.__init__ as the StreamReader limit

    def __init__(
        self,
        handler: GatewayHandler,
        *,
        listener: SmtpListener,
        users: UsersFile | None,
        require_auth: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._listener = listener
        self._users = users
        self._require_auth = require_auth
        self._admitted = False
        self._in_data = False
        self._auth_failures = 0

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common `<local@domain>` without the email package's full RFC 5322 parser (a
        tenth of the cost); anything unusual (quotes, source routes, `<>`) takes that parser."""
        match = _SIMPLE_PATH.match(arg)
        if match is None or len(match.group(1)) > (self.local_part_limit or 1 << 30):
            return super()._getaddr(arg)
        return f"{match.group(1)}@{match.group(2)}", match.group(3)

    # -- connection lifecycle: cap, shutdown ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # STARTTLS re-entry: same session
            super().connection_made(transport)
            return
        refusal = self._listener.admit(self)
        if refusal is not None:
            # Before the greeting and without a session task: a flood costs almost nothing.
            transport.write(refusal.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            self._listener.log_refusal(transport.get_extra_info("peername"), refusal)
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        try:
            super().connection_lost(error)
        finally:
            self._listener.release(self)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return super().eof_received() if self._admitted else False

    @property
    def busy(self) -> bool:
        """In a mail transaction: shutdown lets it finish instead of cutting it off."""
        return self._in_data or (self.envelope is not None and self.envelope.mail_from is not None)

    def close_if_idle(self) -> None:
        if not self.busy and self.transport is not None:
            self.transport.write(REPLY_SHUTTING_DOWN.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    # -- errors and auth policy -----------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        peer = format_peer(self.session.peer if self.session else None)
        if isinstance(error, TLSSetupException):
            log.info("smtp %s: TLS handshake failed: %s", peer, error.__cause__)
        else:
            log.error("smtp %s: internal error, answered 451", peer, exc_info=error)
        return REPLY_TEMPFAIL

    async def check_auth_needed(self, caller_method: str) -> bool:
        # Our own flag: aiosmtpd's auth_required warns for implicit TLS, which is encrypted.
        assert self.session is not None
        if self._require_auth and not self.session.authenticated:
            await self.push(REPLY_AUTH_REQUIRED)
            return True
        return False

    def is_tls(self) -> bool:
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    def protocol_name(self, envelope: Envelope) -> str:
        """RFC 3848 / RFC 6531 `with` keyword for the Received header."""
        assert self.session is not None
        if not self.session.extended_smtp:
            return "SMTP"
        base = "UTF8SMTP" if envelope.smtp_utf8 else "ESMTP"
        return base + ("S" if self.is_tls() else "") + ("A" if self.session.authenticated else "")

    # -- MAIL: SIZE checked before anything is sent ---------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        declared = _declared_size(arg or "")
        if declared is not None and self.data_size_limit and declared > self.data_size_limit:
            log.info(
                "smtp %s: MAIL %s -> 552 (declared size %d > %d)",
                format_peer(self.session.peer),
                arg,
                declared,
                self.data_size_limit,
            )
            await self.push(REPLY_TOO_BIG)
            return
        await super().smtp_MAIL(arg)

    # -- DATA: streamed, bounded, long lines welcome --------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        trace = self._trace_header()
        self._in_data = True
        try:
            content = await self._read_data(trace)
        finally:
            self._in_data = False
        if content is None:
            log.info(
                "smtp %s: from=<%s> -> 552 (message over %d bytes, discarded)",
                format_peer(self.session.peer),
                _sender(self.envelope),
                self.data_size_limit,
            )
            status = REPLY_TOO_BIG
        else:
            self.envelope.content = self.envelope.original_content = content
            self.envelope.trace_length = len(trace)  # type: ignore[attr-defined]
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(REPLY_TEMPFAIL if status is MISSING else status)
        if self._listener.closing and self.transport is not None:
            await self.push(REPLY_SHUTTING_DOWN)
            self.transport.close()

    def _trace_header(self) -> bytes:
        assert self.session is not None and self.envelope is not None
        peer = self.session.peer
        return received_header(
            helo=self.session.host_name,
            peer_ip=str(peer[0] if isinstance(peer, tuple) else peer),
            by=self.hostname,
            protocol=self.protocol_name(self.envelope),
            recipients=self.envelope.rcpt_tos,
        )

    async def _read_data(self, prefix: bytes = b"") -> bytearray | None:
        """`prefix` + the message up to `<CRLF>.<CRLF>`, de-dot-stuffed; None if the message
        exceeded the limit.

        Past the limit the rest is read and dropped, so the client still gets its 552 (it only
        reads replies after the final dot) while memory stays at one limit's worth per session.
        """
        limit = self.data_size_limit or 0
        buffer: bytearray | None = bytearray(prefix)
        size = 0
        at_line_start = True
        last_reset = self.loop.time()
        while True:
            chunk = await self._read_chunk()
            if at_line_start and chunk == b".\r\n":
                return buffer  # stored as it is: no copy of a big mail
            size += len(chunk)
            if buffer is not None and limit and size > limit:
                buffer = None  # stop buffering; keep draining to the final dot
            if buffer is not None:
                buffer += chunk[1:] if at_line_start and chunk.startswith(b".") else chunk
            at_line_start = chunk.endswith(b"\r\n")
            if self.loop.time() - last_reset > 1.0:  # the timeout is for idleness, not size
                self._reset_timeout()
                last_reset = self.loop.time()

    async def _read_chunk(self) -> bytes:
        """One line, or a piece of a line longer than READ_CHUNK_LIMIT (never splits a CRLF)."""
        try:
            return await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            return await self._reader.read(exc.consumed)
        except asyncio.IncompleteReadError:
            raise asyncio.CancelledError from None  # client went away mid-DATA: nothing stored

    def peer_text(self) -> str:
        return format_peer(self.session.peer if self.session else None)


def _quiet_aiosmtpd(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 warns about its own use of Session.login_data on every successful AUTH."""
    return not str(record.msg).startswith("Session.login_data is deprecated")


def _declared_size(arg: str) -> int | None:
    """The SIZE= parameter of a MAIL command (after the address), if any."""
    params = arg.rpartition(">")[2] if ">" in arg else arg
    match = _SIZE_PARAM.search(params)
    return int(match.group(1)) if match else None


# -- listener -----------------------------------------------------------------------------------


class SmtpListener:
    """Binds `settings.listen` on the running loop; counts sessions; closes gracefully."""

    def __init__(
        self,
        settings: SmtpSettings,
        services: tuple[ServiceSettings, ...],
        spool: SpoolWriter,
    ) -> None:
        self.settings = settings
        logging.getLogger("mail.log").addFilter(_quiet_aiosmtpd)
        self.users = UsersFile(settings.auth_users_file) if settings.auth_users_file else None
        self.handler = GatewayHandler(services, spool, offer_auth=self.users is not None)
        self.bound: list[tuple[str, int]] = []
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: set[GatewaySMTP] = set()
        self._refused = 0
        self._refusal_logged_at = -REFUSAL_LOG_INTERVAL
        self._all_gone = asyncio.Event()
        self._all_gone.set()

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def reconfigure(self, services: Sequence[ServiceSettings]) -> None:
        """A reload: new sessions route with `services`; sessions in flight keep their handler."""
        self.handler = GatewayHandler(
            services, self.handler.spool, offer_auth=self.users is not None
        )

    def admit(self, session: GatewaySMTP) -> str | None:
        """Register a new session, or return the 421 reply that refuses it."""
        if self.closing:
            return REPLY_SHUTTING_DOWN
        if len(self._sessions) >= self.settings.max_connections:
            return REPLY_TOO_MANY_CONNECTIONS
        self._sessions.add(session)
        self._all_gone.clear()
        return None

    def log_refusal(self, peer: Any, reply: str) -> None:
        """The first refusal at once, then one summary a minute: a flood must not flood the log."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "smtp %s: refused: %s (%d refused since the last report)",
                format_peer(peer),
                reply,
                self._refused,
            )
            self._refused = 0
            self._refusal_logged_at = now

    def release(self, session: GatewaySMTP) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._all_gone.set()

    async def start(self) -> None:
        """Listen on every configured address; OSError names the address that failed."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if self.settings.tls != "none" else None
        implicit = tls if self.settings.tls == "implicit" else None
        starttls = tls if self.settings.tls == "starttls" else None
        if self.users is not None and tls is None:
            log.warning("SMTP AUTH without TLS: passwords cross the network in clear text")

        def factory() -> GatewaySMTP:
            return self._session(loop, starttls)

        try:
            for entry in self.settings.listen:
                self._servers.append(await self._bind(loop, factory, entry, implicit))
        except OSError:
            await self._close_servers()
            raise
        log.info("smtp listening on %s", ", ".join(format_peer(a) for a in self.bound))

    async def _bind(
        self, loop: asyncio.AbstractEventLoop, factory: Any, entry: str, tls: ssl.SSLContext | None
    ) -> asyncio.AbstractServer:
        host, port = split_hostport(entry)
        try:
            server = await loop.create_server(
                factory,
                host or None,
                port,
                ssl=tls,
                backlog=LISTEN_BACKLOG,
                ssl_handshake_timeout=30.0 if tls else None,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"SMTP cannot listen on {entry}: {exc.strerror or exc}"
            ) from exc
        self.bound.extend(sock.getsockname()[:2] for sock in server.sockets)
        return server

    def _session(
        self, loop: asyncio.AbstractEventLoop, starttls: ssl.SSLContext | None
    ) -> GatewaySMTP:
        s = self.settings
        return GatewaySMTP(
            self.handler,
            listener=self,
            users=self.users,
            require_auth=s.require_auth,
            hostname=s.hostname,
            data_size_limit=s.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=s.session_timeout_seconds,
            tls_context=starttls,
            require_starttls=s.require_tls and starttls is not None,
            # STARTTLS: no AUTH before it. Implicit TLS is encrypted from the first byte, and with
            # tls = "none" the operator chose plaintext (warned about at start).
            auth_require_tls=starttls is not None,
            loop=loop,
        )

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"SMTP TLS: cannot load {s.tls_cert} / {s.tls_key}: {exc}") from exc
        return context

    async def close(self, grace: float) -> None:
        """Stop listening; idle sessions get 421 now, transactions get `grace` seconds to end."""
        self.closing = True
        await self._close_servers()
        for session in list(self._sessions):
            session.close_if_idle()
        try:
            await asyncio.wait_for(self._all_gone.wait(), grace)
        except TimeoutError:
            log.warning(
                "smtp: aborting %d session(s) still open after %.0fs", len(self._sessions), grace
            )
            for session in list(self._sessions):
                session.abort()
            await asyncio.sleep(0)  # let connection_lost callbacks run

    async def _close_servers(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            # Python >= 3.12 waits for every connection here; ours are handled above.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
