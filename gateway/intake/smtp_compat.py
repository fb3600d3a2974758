"""The only module that touches aiosmtpd's private members, checked against its version.

aiosmtpd's public extension points cover almost all of the gateway's SMTP session: handler
hooks (`handle_EHLO/MAIL/RCPT/DATA`), `smtp_*` commands with `@syntax`, `auth_*` mechanisms
with `challenge_auth`, `handle_exception`, `check_auth_needed`, and class attributes such as
`line_length_limit`. What they do not cover is reached here, and only here:

    private member                  used for                     why no public way exists
    SMTP._reader (set by            the DATA reader streams      the StreamReader is handed to
      SMTP._cb_client_connected)    lines itself: long lines,    the private client-connected
                                    size cut-off, no copy        callback and kept nowhere else
    SMTP._reset_timeout(duration)   the idle timer restarts      the timer is only reset between
                                    during a long DATA, with     commands, always with `timeout`;
                                    DATA's own timeout           nothing public does it
    SMTP._getaddr()                 fast path for the plain      the MAIL/RCPT address parser
                                    <local@domain> at MAIL/RCPT  has no hook or override point
    aiosmtpd.smtp.inspect / .dir    per-class cache for the      SMTP.__init__ introspects every
                                    introspection SMTP.__init__  connection with module globals;
                                    runs on every connection     no constructor argument skips it

Sessions reach them through the named methods of `CompatSMTP`; the introspection cache is
applied explicitly by the listener with `install_cached_inspection()`. The installed release
must be in the range these were checked against (`check_aiosmtpd_version`, run at import), and
tests/test_smtp_compat.py fails when a release changes any of them.
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
import logging
import re
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP

# The release range the members above were read in; pyproject.toml pins the same.
SUPPORTED_RANGE = ((1, 4, 6), (1, 5, 0))
SUPPORTED_TEXT = "aiosmtpd>=1.4.6,<1.5"

# Private methods and their parameters, as read in the supported releases.
PRIVATE_METHODS: dict[str, tuple[str, ...]] = {
    "_getaddr": ("self", "arg"),
    "_reset_timeout": ("self", "duration"),
    "_cb_client_connected": ("self", "reader", "writer"),  # stores `_reader`
}


class UnsupportedAiosmtpdError(ImportError):
    """The installed aiosmtpd is outside the range whose private members were checked."""


def check_aiosmtpd_version(version: str) -> None:
    """Raise UnsupportedAiosmtpdError unless `version` is in SUPPORTED_RANGE.

    A release outside it may have renamed a private member this module relies on, which would
    break sessions at run time; failing at import says so before the first mail.
    """
    release = _release_of(version)
    low, high = SUPPORTED_RANGE
    if release is None or not low <= release < high:
        raise UnsupportedAiosmtpdError(
            f"aiosmtpd {version} is installed, but the gateway's SMTP listener was written for "
            f"{SUPPORTED_TEXT} (gateway/intake/smtp_compat.py relies on private members of "
            f"those releases). Install a supported release: pip install '{SUPPORTED_TEXT}'"
        )


def _release_of(version: str) -> tuple[int, ...] | None:
    """(1, 4, 6) from '1.4.6' or '1.4.6.post1'; None if it does not start like a release."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        return None
    return tuple(int(part) for part in match.groups(default="0"))


check_aiosmtpd_version(aiosmtpd.__version__)


# -- the session's private members, under names ----------------------------------------------


class CompatSMTP(SMTP):
    """`aiosmtpd.smtp.SMTP` with the private members the gateway needs as named methods.

    Subclasses override `parse_address` (never `_getaddr`) and use `stream_reader()` and
    `restart_idle_timer()`; no other module names an aiosmtpd private member.
    """

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """The MAIL/RCPT path and the rest of the argument, by aiosmtpd's own parser:
        (None, None) for a malformed address, ('', '') for an empty argument."""
        return super()._getaddr(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # SMTP.smtp_MAIL and SMTP.smtp_RCPT call this; the override point is parse_address.
        return self.parse_address(arg)

    def stream_reader(self) -> asyncio.StreamReader:
        """The connection's reader (after STARTTLS it reads the decrypted stream)."""
        return self._reader

    def restart_idle_timer(self, duration: float | None = None) -> None:
        """Start the session's idle timeout again, as aiosmtpd does after every command;
        `duration` instead of the session's `timeout` for this one wait (DATA's own)."""
        self._reset_timeout(duration)


# -- aiosmtpd's per-connection introspection, cached ------------------------------------------


_HOOKS = ("handle_", "smtp_", "auth_")  # the member prefixes aiosmtpd's SMTP.__init__ collects


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
        """The class's attribute names (cached) plus the instance's own, like `dir(obj)`, but
        only those aiosmtpd looks for (`handle_*`, `smtp_*`, `auth_*`): every use in
        aiosmtpd.smtp filters by these prefixes, and each connection walked the whole list."""
        if obj is None:
            raise TypeError("dir() without an argument is not supported here")
        kind = type(obj)
        names = self._names.get(kind)
        if names is None:
            names = self._names[kind] = [n for n in builtins.dir(kind) if n.startswith(_HOOKS)]
        own = [n for n in getattr(obj, "__dict__", ()) if n.startswith(_HOOKS)]
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


def install_cached_inspection() -> None:
    """Point aiosmtpd.smtp's `inspect` and `dir` at the per-class cache (once per process).

    This affects every aiosmtpd SMTP instance in the process, which is why the listener calls
    it explicitly instead of it happening on import.
    """
    if isinstance(aiosmtpd_smtp.inspect, _ClassCachedInspection):
        return
    cached = _ClassCachedInspection()
    aiosmtpd_smtp.inspect = cached  # type: ignore[assignment]
    aiosmtpd_smtp.dir = cached.dir  # type: ignore[attr-defined]  # shadows the builtin there


# -- aiosmtpd's own log noise -------------------------------------------------------------------


def _not_login_data_deprecation(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 warns about its own use of Session.login_data on every successful AUTH."""
    return not str(record.msg).startswith("Session.login_data is deprecated")


def silence_login_data_deprecation() -> None:
    """Drop that warning from aiosmtpd's `mail.log` logger (idempotent)."""
    logging.getLogger("mail.log").addFilter(_not_login_data_deprecation)
