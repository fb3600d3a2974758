"""The SMTP listener: sockets on the service's own event loop, the connection cap, shutdown.

`SmtpListener` binds the configured addresses (plain, STARTTLS or implicit TLS) and builds one
`smtp_session.GatewaySMTP` per connection with the current handler (a reload swaps `handler`;
sessions in flight keep the one they started with). It admits sessions up to
`max_connections`, and up to `max_unauthenticated_per_ip` sessions from one client address
that have not authenticated; the rest get 421 before the greeting. With `require_auth`, an
address locked out of AUTH (`smtp_limits.AuthThrottle`, kept here across sessions) gets 421
too. Every refusal is counted by reason for `/metrics` and logged, rate-limited
(`smtp_limits.Refusals`). Shutdown is graceful: idle sessions are told 421 at once, sessions in
a transaction may finish (their 250 still waits for the spool commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.config import ServiceSettings, SmtpSettings, split_hostport
from gateway.intake.flow import IntakePacing
from gateway.intake.smtp_auth import UsersFile
from gateway.intake.smtp_compat import install_cached_inspection, silence_login_data_deprecation
from gateway.intake.smtp_handler import GatewayHandler, format_peer
from gateway.intake.smtp_limits import AuthThrottle, Refusals
from gateway.intake.smtp_session import REPLY_SHUTTING_DOWN, GatewaySMTP
from gateway.intake.spool import SpoolWriter

log = logging.getLogger(__name__)

REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
REPLY_AUTH_LOCKED_OUT_AT_CONNECT = (
    "421 4.7.0 Too many failed authentication attempts from your address, try again later"
)
LISTEN_BACKLOG = 1024


class SmtpListener:
    """Binds `settings.listen` on the running loop; counts sessions; closes gracefully."""

    def __init__(
        self,
        settings: SmtpSettings,
        services: tuple[ServiceSettings, ...],
        spool: SpoolWriter,
    ) -> None:
        self.settings = settings
        # aiosmtpd adjustments that reach beyond one session, applied here and not on import.
        install_cached_inspection()
        silence_login_data_deprecation()
        self.users = UsersFile(settings.auth_users_file) if settings.auth_users_file else None
        self.pacing = IntakePacing(
            spool.undecided,
            backlog=settings.in_flow_backlog,
            max_delay=settings.in_flow_delay_seconds,
        )
        self.handler = GatewayHandler(
            services, spool, offer_auth=self.users is not None, pacing=self.pacing
        )
        self.bound: list[tuple[str, int]] = []
        self.closing = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: set[GatewaySMTP] = set()
        self._unauthenticated: dict[GatewaySMTP, str] = {}  # session -> its client address
        self._per_address: Counter[str] = Counter()  # unauthenticated sessions per address
        self.login_throttle = AuthThrottle(
            max_failures=settings.auth_max_failures,
            lockout_seconds=settings.auth_lockout_seconds,
            max_delay=settings.auth_failure_delay_seconds,
        )
        self.refusals = Refusals()
        self._all_gone = asyncio.Event()
        self._all_gone.set()

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def reconfigure(self, services: Sequence[ServiceSettings]) -> None:
        """A reload: new sessions route with `services`; sessions in flight keep their handler."""
        self.handler = GatewayHandler(
            services, self.handler.spool, offer_auth=self.users is not None, pacing=self.pacing
        )

    @property
    def pacing_counts(self) -> Mapping[str, float]:
        """Pacing since start (`flow.PacingCounts`), for `/metrics`."""
        return vars(self.pacing.counts)

    @property
    def refusal_counts(self) -> Mapping[str, int]:
        """Refusals since start, by reason (`smtp_limits.REFUSAL_REASONS`), for `/metrics`."""
        return self.refusals.counts

    def admit(self, session: GatewaySMTP, peer: Any) -> str | None:
        """Register a new session, or count, log and return the 421 reply that refuses it."""
        refusal = self._refusal(session.client_key())
        if refusal is not None:
            reason, reply = refusal
            self.refusals.record(reason, peer, f"connection refused: {reply}")
            return reply
        self._sessions.add(session)
        self._unauthenticated[session] = session.client_key()
        self._per_address[session.client_key()] += 1
        self._all_gone.clear()
        return None

    def _refusal(self, client: str) -> tuple[str, str] | None:
        """(reason, reply) when a new connection from `client` must be refused."""
        s = self.settings
        if self.closing:
            return "shutting_down", REPLY_SHUTTING_DOWN
        if len(self._sessions) >= s.max_connections:
            return "too_many_connections", REPLY_TOO_MANY_CONNECTIONS
        if self._per_address[client] >= s.max_unauthenticated_per_ip:
            return "too_many_from_address", REPLY_TOO_MANY_FROM_ADDRESS
        if s.require_auth and self.login_throttle.locked_for(client):
            return "auth_locked_out", REPLY_AUTH_LOCKED_OUT_AT_CONNECT
        return None

    def authenticated(self, session: GatewaySMTP) -> None:
        """An authenticated session no longer counts against its address's cap."""
        self._forget_unauthenticated(session)

    def release(self, session: GatewaySMTP) -> None:
        """Forget a session that has ended (shutdown waits until none is left)."""
        self._forget_unauthenticated(session)
        self._sessions.discard(session)
        if not self._sessions:
            self._all_gone.set()

    def _forget_unauthenticated(self, session: GatewaySMTP) -> None:
        client = self._unauthenticated.pop(session, None)
        if client is not None:
            self._per_address[client] -= 1
            if self._per_address[client] <= 0:
                del self._per_address[client]

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
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], GatewaySMTP],
        entry: str,
        tls: ssl.SSLContext | None,
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
        except OSError as exc:  # the loop's own wording repeats the address: say it once
            reason = os.strerror(exc.errno) if exc.errno else exc.strerror or exc
            raise OSError(exc.errno, f"SMTP cannot listen on {entry}: {reason}") from exc
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
            max_session_seconds=s.max_session_seconds,
            data_timeout_seconds=s.data_timeout_seconds,
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
        """Stop accepting; the sessions already admitted are `close`'s business."""
        for server in self._servers:
            server.close()
        for server in self._servers:
            # Python >= 3.12 waits for every connection here; ours are handled above.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
