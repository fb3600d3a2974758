"""Connecting to an IMAP server: TLS or STARTTLS, login (password or XOAUTH2), timeouts, closing.

Every socket read is bounded (`timeouts`): a server that stops answering (frozen, or a dead
link with no RST) raises `TimeoutError` within ``1.5 * keepalive_seconds`` instead of hanging
the account's thread.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import LoginError

from gateway.config import ImapSettings
from gateway.errors import GatewayError

_CONNECT_TIMEOUT = 15.0
_READ_TIMEOUT_PER_KEEPALIVE = 1.5  # an answer may take this many keepalive intervals
_TOKEN_COMMAND_TIMEOUT = 30.0


class ImapError(GatewayError):
    """The IMAP session failed; the poller reconnects with backoff."""


class ImapAuthError(ImapError):
    """The server refused our credentials, or no OAuth2 token could be obtained."""


def timeouts(settings: ImapSettings) -> SocketTimeout:
    """Socket timeouts: no read waits longer than 1.5 keepalive intervals, so a silent server
    is noticed within 2.5 intervals (one of waiting for its IDLE/NOOP answer, then this)."""
    read = _READ_TIMEOUT_PER_KEEPALIVE * settings.keepalive_seconds
    return SocketTimeout(connect=min(_CONNECT_TIMEOUT, read), read=read)


def connect(settings: ImapSettings) -> IMAPClient:
    """Open the connection (tls | starttls | none) and log in; the caller closes it."""
    context = _ssl_context(settings) if settings.security != "none" else None
    tls = settings.security == "tls"
    client = IMAPClient(
        settings.host,
        settings.port,
        ssl=tls,
        ssl_context=context if tls else None,
        timeout=timeouts(settings),
    )
    try:
        if settings.security == "starttls":
            client.starttls(context)
        _tcp_keepalive(client)
        login(client, settings)
    except BaseException:
        close(client, polite=False)
        raise
    return client


def _ssl_context(settings: ImapSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _tcp_keepalive(client: IMAPClient) -> None:
    """TCP keepalive as well: a connection dropped by a NAT or firewall also fails writes."""
    sock = client.socket()
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def login(client: IMAPClient, settings: ImapSettings) -> None:
    """LOGIN with the password, else AUTHENTICATE XOAUTH2 with a fresh token."""
    try:
        if settings.password is not None:
            client.login(settings.username, settings.password)
        else:
            client.oauth2_login(settings.username, oauth2_token(settings))
    except LoginError as exc:
        raise ImapAuthError(
            f"authentication failed for {settings.username}: {text_of(exc)}"
        ) from None


def oauth2_token(settings: ImapSettings) -> str:
    """The configured token, or the output of ``oauth2_token_command``.

    The command runs on every (re)connect, because access tokens expire within the hour; a
    helper such as `oauth2ms` or `gcloud auth print-access-token` refreshes it.
    """
    if settings.oauth2_token:
        return settings.oauth2_token
    command = settings.oauth2_token_command or ""
    try:
        result = subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=_TOKEN_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImapAuthError(f"oauth2_token_command failed: {exc}") from None
    token = result.stdout.strip().splitlines()[0].strip() if result.stdout.strip() else ""
    if result.returncode != 0 or not token:
        detail = result.stderr.strip()[:200] or f"exit status {result.returncode}, no token printed"
        raise ImapAuthError(f"oauth2_token_command failed: {detail}")
    return token


def close(client: IMAPClient, *, polite: bool = True) -> None:
    """LOGOUT politely; if that fails, or the server is known to be gone (`polite=False`: a
    LOGOUT would only wait out the read timeout), the socket is closed anyway."""
    if polite:
        try:
            client.logout()
            return
        except Exception:
            pass
    with contextlib.suppress(Exception):
        client.shutdown()


def interrupt(client: IMAPClient) -> None:
    """Wake a thread blocked on the socket: shut down the TCP socket underneath (also for TLS)."""
    with contextlib.suppress(Exception):
        sock = client.socket()
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def connection_lost(exc: BaseException) -> bool:
    """True when `exc` leaves the session unusable (socket error, timeout, BYE); False for a
    server's NO/BAD answer to one command, after which the session goes on."""
    return isinstance(exc, OSError | IMAPClient.AbortError)


def describe(exc: BaseException, settings: ImapSettings) -> str:
    """One line for the state, the log and the health page; never a traceback."""
    if isinstance(exc, ImapError):
        return str(exc)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return f"TLS error: {exc}"
    if isinstance(exc, TimeoutError):
        seconds = timeouts(settings).read
        return f"the server did not answer within {seconds:g} s (keepalive)"
    if isinstance(exc, OSError):
        return f"connection failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {text_of(exc)}"


def text_of(exc: BaseException) -> str:
    text = str(exc)
    return text[2:-1] if text.startswith(("b'", 'b"')) else text
