"""SMTP AUTH users file: `user:hash` lines, password hashing and constant-time verification.

File format (one account per line, `#` starts a comment line, blank lines are ignored)::

    # created with `gateway hash-password helpdesk` or `htpasswd -nB helpdesk`
    helpdesk:$scrypt$ln=14,r=8,p=1$<salt>$<key>
    zendesk:$2y$05$...                                       # bcrypt, as htpasswd -B writes it

Accepted hashes:

* **bcrypt** (`$2a$`, `$2b$`, `$2y$`), the format of `htpasswd -B` and Dovecot's `BLF-CRYPT`.
* **scrypt** (`$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>`, salt and key in standard base64
  without padding), what `gateway hash-password` writes by default: it needs only the stdlib.

Verification is slow on purpose (tens to hundreds of milliseconds), so the listener runs it in a
worker thread, and remembers a keyed digest of the last good password per user so that a
helpdesk which logs in on every connection pays the hash cost once, not per mail. The file is
re-read when its modification time or size changes; a broken edit keeps the last good accounts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
from base64 import b64decode
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword

from gateway.errors import ConfigError, Problem
from gateway.intake.smtp_limits import AuthThrottle

log = logging.getLogger(__name__)

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
SCRYPT_PREFIX = "$scrypt$"
SCHEMES = ("scrypt", "bcrypt")
# N=2^14, r=8: 16 MiB and about 35 ms per check here; OWASP's minimum for scrypt.
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
BCRYPT_ROUNDS = 12
_SCRYPT_MAXMEM = 256 * 1024 * 1024


# -- hashing ------------------------------------------------------------------------------------


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A users-file hash for `password` (`scheme` is 'scrypt' or 'bcrypt')."""
    secret = password.encode("utf-8")
    if scheme == "bcrypt":
        bcrypt = _bcrypt()
        if len(secret) > 72:
            raise ValueError("bcrypt uses at most 72 bytes of a password; use scrypt instead")
        return bcrypt.hashpw(secret, bcrypt.gensalt(BCRYPT_ROUNDS)).decode("ascii")
    if scheme != "scrypt":
        raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    salt = os.urandom(16)
    key = _scrypt(secret, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P)
    params = f"ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}"
    return f"{SCRYPT_PREFIX}{params}${_b64(salt)}${_b64(key)}"


def verify_password(password: bytes, hashed: str) -> bool:
    """Constant-time check of `password` against one users-file hash; False for unknown formats."""
    try:
        if hashed.startswith(BCRYPT_PREFIXES):
            return _bcrypt().checkpw(password, hashed.encode("ascii"))
        if hashed.startswith(SCRYPT_PREFIX):
            log_n, r, p, salt, key = _parse_scrypt(hashed)
            return hmac.compare_digest(_scrypt(password, salt, log_n, r, p, len(key)), key)
    except ValueError:  # e.g. bcrypt refuses passwords over 72 bytes
        return False
    return False


def check_hash(hashed: str) -> str | None:
    """Why `hashed` is unusable, or None; used when loading the file so typos show up early."""
    if hashed.startswith(BCRYPT_PREFIXES):
        if len(hashed) != 60:
            return "malformed bcrypt hash (expected 60 characters)"
        try:
            _bcrypt()
        except ImportError:
            return "bcrypt hashes need the 'bcrypt' package (pip install bcrypt)"
        return None
    if hashed.startswith(SCRYPT_PREFIX):
        try:
            _parse_scrypt(hashed)
        except ValueError as exc:
            return f"malformed scrypt hash: {exc}"
        return None
    return (
        "unknown hash format (expected bcrypt $2b$/$2y$ or $scrypt$; see `gateway hash-password`)"
    )


def _bcrypt():
    import bcrypt  # imported lazily: only bcrypt lines need it

    return bcrypt


def _scrypt(secret: bytes, salt: bytes, log_n: int, r: int, p: int, dklen: int = 32) -> bytes:
    return hashlib.scrypt(
        secret, salt=salt, n=2**log_n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=dklen
    )


def _parse_scrypt(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    parts = hashed.split("$")  # '', 'scrypt', 'ln=..,r=..,p=..', salt, key
    if len(parts) != 5:
        raise ValueError("expected $scrypt$ln=N,r=R,p=P$salt$key")
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        salt, key = _unb64(parts[3]), _unb64(parts[4])
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read parameters ({exc})") from None
    if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16) or len(salt) < 8 or len(key) < 16:
        raise ValueError("parameters out of range")
    return log_n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


# -- the users file -----------------------------------------------------------------------------


def load_users(path: Path) -> dict[str, str]:
    """Parse a users file into {user: hash}; ConfigError names the file and line of each mistake."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(Problem(str(path), f"cannot read users file: {exc}")) from None
    users: dict[str, str] = {}
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        reason = "expected user:hash" if not (sep and user and hashed) else check_hash(hashed)
        if reason is None and user in users:
            reason = f"duplicate user {user!r}"
        if reason:
            problems.append(Problem(str(path), reason, number))
        else:
            users[user] = hashed
    if problems:
        raise ConfigError(problems)
    return users


@dataclass(frozen=True)
class _Remembered:
    hashed: str
    digest: bytes


class UsersFile:
    """The accounts allowed to AUTH; thread-safe, so checks can run in worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._users = load_users(path)  # a broken file at start-up is a config error
        self._key = secrets.token_bytes(32)
        self._remembered: dict[str, _Remembered] = {}
        # Unknown users are checked against this, so a miss costs as much as a wrong password.
        self._decoy = hash_password(secrets.token_urlsafe(16))

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, user: str, password: bytes) -> bool:
        """True if `user` exists and `password` matches; slow (run it off the event loop)."""
        self._reload_if_changed()
        with self._lock:
            hashed = self._users.get(user)
            remembered = self._remembered.get(user)
        digest = hmac.new(self._key, password, hashlib.sha256).digest()
        if (
            hashed
            and remembered
            and remembered.hashed == hashed
            and hmac.compare_digest(remembered.digest, digest)
        ):
            return True
        ok = verify_password(password, hashed or self._decoy) and hashed is not None
        if ok:
            with self._lock:
                self._remembered[user] = _Remembered(hashed, digest)
        return ok

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload_if_changed(self) -> None:
        stamp = self._file_stamp()
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
        try:
            users = load_users(self.path)
        except ConfigError as exc:
            log.error(
                "users file not reloaded, keeping the previous %d account(s): %s",
                len(self._users),
                exc,
            )
            return
        with self._lock:
            self._users = users
            self._remembered.clear()
        log.info("users file reloaded: %d account(s) from %s", len(users), self.path)


# -- the AUTH mechanisms of the SMTP session ---------------------------------------------------

REPLY_TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many failed authentication attempts"
REPLY_AUTH_LOCKED_OUT = (
    "454 4.7.0 Too many failed authentication attempts from your address, try again later"
)
MAX_AUTH_FAILURES = 3
_HANDLED = AuthResult(success=False, handled=True)  # the reply was already sent


def _shown(user: str) -> str:
    """A client-chosen user name for the log: quoted, escaped, and cut (AUTH LOGIN's answer
    to the username challenge may be a 64 KiB line)."""
    return repr(user[:100]) + ("..." if len(user) > 100 else "")


class AuthMechanisms:
    """AUTH PLAIN and LOGIN for `smtp_session.GatewaySMTP`, with the slow hash off the event loop.

    aiosmtpd's `authenticator=` callback is synchronous, so a 35-250 ms scrypt/bcrypt check would
    stall every session; these replace its built-in mechanisms. Three failures end the session.
    Across sessions, `smtp_limits.AuthThrottle` delays each failure of a client address and then
    locks the address out: while it is, AUTH is answered 454 4.7.0 without checking anything,
    also when a check that was already running would have succeeded (its answer would tell a
    guesser the password).

    The session class provides `push`, `challenge_auth`, `session`, `transport`, `peer_text()`,
    `client_key()`, `refused()`, `authenticated()`, `login_throttle`, `_users` (a UsersFile or
    None) and `_auth_failures`.
    """

    push: Any
    challenge_auth: Any
    session: Any
    transport: Any
    _users: UsersFile | None
    login_throttle: AuthThrottle
    _auth_failures: int
    AuthLoginUsernameChallenge: str
    AuthLoginPasswordChallenge: str

    def peer_text(self) -> str:
        raise NotImplementedError

    def client_key(self) -> str:
        raise NotImplementedError

    def refused(self, reason: str, text: str) -> None:
        raise NotImplementedError

    def authenticated(self) -> None:
        raise NotImplementedError

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._initial_response(args, "")
        if blob is None:
            return _HANDLED
        parts = blob.split(b"\x00")  # authzid \0 authcid \0 password (RFC 4616)
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return _HANDLED
        return await self._check_login("PLAIN", parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._initial_response(args, self.AuthLoginUsernameChallenge)
        if login is None:
            return _HANDLED
        password = await self._challenge(self.AuthLoginPasswordChallenge)
        if password is None:
            return _HANDLED
        return await self._check_login("LOGIN", login, password)

    async def _initial_response(self, args: list[str], challenge: str) -> bytes | None:
        if len(args) == 1:
            return await self._challenge(challenge)
        try:
            return b64decode(args[1].encode(), validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _challenge(self, challenge: str) -> bytes | None:
        # challenge_auth has already answered 501 when the client aborted or sent bad base64.
        response = await self.challenge_auth(challenge)
        return None if response is MISSING else response  # type: ignore[return-value]

    async def _check_login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        assert self.session is not None
        user = login.decode("utf-8", errors="replace")
        if self.login_throttle.locked_for(self.client_key()):
            return await self._locked_out(mechanism, user)
        users = self._users
        ok = users is not None and await asyncio.to_thread(users.verify, user, password)
        if self.login_throttle.locked_for(self.client_key()):  # locked by other sessions meanwhile
            return await self._locked_out(mechanism, user)
        if ok:
            log.info("smtp %s: AUTH %s ok for %r", self.peer_text(), mechanism, user)
            self.authenticated()
            return AuthResult(success=True, auth_data=LoginPassword(login, b""))
        return await self._failed(mechanism, user)

    async def _failed(self, mechanism: str, user: str) -> AuthResult:
        """A wrong user or password: counted, logged, answered after the throttle's delay."""
        penalty = self.login_throttle.failed(self.client_key())
        self._auth_failures += 1
        self.refused(
            "auth_failed",
            f"AUTH {mechanism} failed for {_shown(user)}: failure {penalty.failures} from this address,"
            f" answered after {penalty.delay:.2f}s"
            + (", address now locked out" if penalty.locked else ""),
        )
        await asyncio.sleep(penalty.delay)
        if self._auth_failures >= MAX_AUTH_FAILURES and self.transport is not None:
            await self.push(REPLY_TOO_MANY_AUTH_FAILURES)
            self.transport.close()
            return _HANDLED
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8

    async def _locked_out(self, mechanism: str, user: str) -> AuthResult:
        """The address is locked out: 454, no password checked, no answer revealed."""
        remaining = self.login_throttle.locked_for(self.client_key())
        self.refused(
            "auth_locked_out",
            f"AUTH {mechanism} for {_shown(user)} refused, address locked out for {remaining:.0f}s"
            f" more: {REPLY_AUTH_LOCKED_OUT[:9]}",
        )
        await self.push(REPLY_AUTH_LOCKED_OUT)
        return _HANDLED
