"""One SMTP session: aiosmtpd's protocol with the defaults a public MX gateway needs changed.

`GatewaySMTP` subclasses aiosmtpd's `SMTP` (through `smtp_compat.CompatSMTP`, the only place
private members are reached) and, per connection:

* asks the listener to admit it before the greeting (the connection cap, the cap per client
  address, an address locked out of AUTH, shutdown);
* ends after `max_session_seconds` however busy it is (421 4.4.2): a NOOP just under the idle
  timeout, or a line of DATA every few seconds, cannot keep a slot for ever; a mail whose commit
  is under way still gets its 250 first;
* lets DATA go at most `data_timeout_seconds` without a byte;
* rejects MAIL with SIZE= over the limit at once, with RFC 3463 codes (552 5.3.4);
* reads DATA itself: long lines are accepted, buffering stops at the size limit, the idle
  timeout restarts while bytes arrive, and the Received: line is written in front of the
  message while reading (no second copy of a big mail);
* checks AUTH passwords off the event loop (`smtp_auth.AuthMechanisms`);
* answers 451 4.3.0 for our own faults (never a traceback, never a 5xx);
* names no software or version in any reply (the greeting is `220 <hostname> ESMTP`).

The business decisions (routing, sender policy, the spool) belong to the handler
(`smtp_handler.GatewayHandler`); sockets and the session count to `smtp_listener`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Protocol

from aiosmtpd.smtp import Envelope, TLSSetupException, syntax

from gateway.intake.smtp_auth import AuthMechanisms, UsersFile
from gateway.intake.smtp_compat import CompatSMTP
from gateway.intake.smtp_handler import (
    REPLY_TEMPFAIL,
    GatewayHandler,
    envelope_sender,
    format_peer,
    received_header,
)
from gateway.intake.smtp_limits import AuthThrottle, Refusals, client_key

log = logging.getLogger(__name__)

REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_SESSION_TOO_LONG = "421 4.4.2 Session time limit reached, try again"
# After a last reply to a client that may still be sending, what it sends is read and dropped
# this long before the socket closes (see `_close_after`).
LINGER_SECONDS = 1.0
# After the host name in the greeting; aiosmtpd's default ("Python SMTP 1.4.6") tells a scanner
# which release, and so which known bugs, it is talking to.
GREETING_IDENT = "ESMTP"

# StreamReader chunk limit: DATA lines longer than this arrive in pieces and are still accepted.
READ_CHUNK_LIMIT = 64 * 1024
_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)(?=\s|$)", re.IGNORECASE)
# <local@domain> with a plain dot-atom local part and a hostname: no quoting, comments or routes
_SIMPLE_PATH = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@([A-Za-z0-9.-]+)>\s*(.*)", re.DOTALL
)


class Admission(Protocol):
    """What a session needs from its listener (kept abstract so neither imports the other)."""

    closing: bool
    login_throttle: AuthThrottle
    refusals: Refusals

    def admit(self, session: GatewaySMTP, peer: Any) -> str | None: ...

    def authenticated(self, session: GatewaySMTP) -> None: ...

    def release(self, session: GatewaySMTP) -> None: ...


class GatewaySMTP(AuthMechanisms, CompatSMTP):
    """One SMTP session, with the gateway's limits and replies (see the module docstring)."""

    line_length_limit = READ_CHUNK_LIMIT  # used by SMTP.__init__ as the StreamReader limit

    def __init__(
        self,
        handler: GatewayHandler,
        *,
        listener: Admission,
        users: UsersFile | None,
        require_auth: bool,
        max_session_seconds: float = 600.0,
        data_timeout_seconds: float = 120.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, ident=GREETING_IDENT, **kwargs)
        self._listener = listener
        self._users = users
        self._require_auth = require_auth
        self._max_session_seconds = max_session_seconds
        self._data_timeout = data_timeout_seconds
        self._admitted = False
        self._in_data = False
        self._committing = False  # handle_DATA is storing the mail: its reply must go out
        self._out_of_time = False
        self._draining = False  # a last reply went out: input is dropped until the close
        self._lifetime: asyncio.TimerHandle | None = None
        self._client = ""
        self._auth_failures = 0

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """The common `<local@domain>` without the email package's full RFC 5322 parser (a
        tenth of the cost); anything unusual (quotes, source routes, `<>`) takes that parser."""
        match = _SIMPLE_PATH.match(arg)
        if match is None or len(match.group(1)) > (self.local_part_limit or 1 << 30):
            return super().parse_address(arg)
        return f"{match.group(1)}@{match.group(2)}", match.group(3)

    # -- connection lifecycle: caps, lifetime, shutdown -----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:  # STARTTLS re-entry: the same session on the encrypted transport
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self._client = client_key(peer)
        refusal = self._listener.admit(self, peer)
        if refusal is not None:
            # Before the greeting and without a session task: a flood costs almost nothing.
            transport.write(refusal.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._lifetime = self.loop.call_later(self._max_session_seconds, self._end_of_lifetime)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        if self._lifetime is not None:
            self._lifetime.cancel()
        try:
            super().connection_lost(error)
        finally:
            self._listener.release(self)

    def _end_of_lifetime(self) -> None:
        """`max_session_seconds` are over: 421 and close, in whatever state the session is.
        Nothing is lost: an unfinished mail was never acknowledged, and a mail being committed
        gets its reply first (smtp_DATA closes the session after it)."""
        self._out_of_time = True
        self.refused(
            "session_lifetime",
            f"session open {self._max_session_seconds:.0f}s, the limit: {REPLY_SESSION_TOO_LONG}",
        )
        if self._committing or self.transport is None:
            return
        self._close_after(REPLY_SESSION_TOO_LONG)

    def _close_after(self, reply: str) -> None:
        """Send a last reply and close, reading and dropping input for LINGER_SECONDS first.

        A client in the middle of DATA keeps writing; closing at once would make our kernel
        answer its next bytes with a reset, and a reset can discard the reply before the
        client has read it. So the session stops processing input, and closes a moment later.
        """
        assert self.transport is not None
        self.transport.write(reply.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
        self._draining = True
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    @property
    def login_throttle(self) -> AuthThrottle:
        """Failed AUTH per client address, kept by the listener across sessions."""
        return self._listener.login_throttle

    def client_key(self) -> str:
        """The address the per-client limits count this session by (`smtp_limits`)."""
        return self._client

    def refused(self, reason: str, text: str) -> None:
        """Count and log (rate-limited) something this session refused."""
        self._listener.refusals.record(reason, self.session.peer if self.session else None, text)

    def authenticated(self) -> None:
        """AUTH succeeded: the session no longer counts as unauthenticated for its address."""
        self._listener.authenticated(self)

    async def push(self, status: str | bytes) -> None:
        """aiosmtpd's push, silent once the last reply went out: a command read just before
        the session's end must not be answered after its 421."""
        if not self._draining:
            await super().push(status)

    def data_received(self, data: bytes) -> None:
        if self._admitted and not self._draining:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return super().eof_received() if self._admitted else False

    @property
    def busy(self) -> bool:
        """In a mail transaction: shutdown lets it finish instead of cutting it off."""
        return self._in_data or (self.envelope is not None and self.envelope.mail_from is not None)

    def close_if_idle(self) -> None:
        """At shutdown: an idle session is told 421 and closed; a busy one may finish."""
        if not self.busy and self.transport is not None:
            self.transport.write(REPLY_SHUTTING_DOWN.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (shutdown grace ran out)."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    # -- errors and auth policy -----------------------------------------------------------------

    async def handle_exception(self, error: Exception) -> str:
        """Our own fault is 451 and a log line; aiosmtpd's default is 500 with the exception."""
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

    def peer_text(self) -> str:
        return format_peer(self.session.peer if self.session else None)

    # -- MAIL: SIZE checked before anything is sent ---------------------------------------------

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        declared = declared_size(arg or "")
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
        self.restart_idle_timer()  # the commit may take longer than the DATA timeout
        self._committing = True
        try:
            await self._finish_data(content, trace)
        finally:
            self._committing = False

    async def _finish_data(self, content: bytearray | None, trace: bytes) -> None:
        """Store (or refuse) the mail read by DATA and answer; then the session goes on under
        the idle timeout, unless the listener closes or the session's time is up."""
        assert self.envelope is not None and self.session is not None
        if content is None:
            log.info(
                "smtp %s: from=<%s> -> 552 (message over %d bytes, discarded)",
                format_peer(self.session.peer),
                envelope_sender(self.envelope),
                self.data_size_limit,
            )
            status = REPLY_TOO_BIG
        else:
            self.envelope.content = self.envelope.original_content = content
            self.envelope.trace_length = len(trace)  # type: ignore[attr-defined]
            status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
        self.envelope = Envelope()  # the transaction is over, as in aiosmtpd's own DATA
        await self.push(status)
        if self.transport is None:  # gone meanwhile: no timer for a closed session
            return
        self.restart_idle_timer()  # the client's next command gets the whole idle timeout
        if self._out_of_time:
            self._close_after(REPLY_SESSION_TOO_LONG)
        elif self._listener.closing:
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
        reader = self.stream_reader()
        limit = self.data_size_limit or 0
        buffer: bytearray | None = bytearray(prefix)
        size = 0
        at_line_start = True
        timeout = self._data_timeout
        rearm_every = min(1.0, timeout / 4)  # not per line: a timer per line costs
        self.restart_idle_timer(timeout)
        last_reset = self.loop.time()
        while True:
            chunk = await _read_chunk(reader)
            if at_line_start and chunk == b".\r\n":
                return buffer  # stored as it is: no copy of a big mail
            size += len(chunk)
            if buffer is not None and limit and size > limit:
                buffer = None  # stop buffering; keep draining to the final dot
            if buffer is not None:
                buffer += chunk[1:] if at_line_start and chunk.startswith(b".") else chunk
            at_line_start = chunk.endswith(b"\r\n")
            if self.loop.time() - last_reset > rearm_every:  # for idleness, not for size
                self.restart_idle_timer(timeout)
                last_reset = self.loop.time()


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One line, or a piece of a line longer than READ_CHUNK_LIMIT (never splits a CRLF)."""
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError as exc:
        return await reader.read(exc.consumed)
    except asyncio.IncompleteReadError:
        raise asyncio.CancelledError from None  # client went away mid-DATA: nothing stored


def declared_size(arg: str) -> int | None:
    """The SIZE= parameter of a MAIL command (after the address), if any."""
    params = arg.rpartition(">")[2] if ">" in arg else arg
    match = _SIZE_PARAM.search(params)
    return int(match.group(1)) if match else None
