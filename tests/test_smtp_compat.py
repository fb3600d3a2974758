"""aiosmtpd's members the gateway relies on: fails loudly when a release changes one.

`gateway.intake.smtp_compat` is the only module that touches aiosmtpd's private members; these
tests check each of them (it exists, takes the parameters it took, still does its job on a real
loopback session), the version gate, the introspection cache's assumptions about
`SMTP.__init__`, and that the session's own names do not collide with aiosmtpd's.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import Awaitable, Callable
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
import pytest
from aiosmtpd.smtp import SMTP, syntax

from gateway.intake import smtp_compat
from gateway.intake.smtp_compat import (
    PRIVATE_METHODS,
    SUPPORTED_TEXT,
    CompatSMTP,
    UnsupportedAiosmtpdError,
    _ClassCachedInspection,
    check_aiosmtpd_version,
)
from gateway.intake.smtp_handler import GatewayHandler
from gateway.intake.smtp_session import GatewaySMTP

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0

# Public members the session overrides or calls: a rename upstream would silently bypass an
# override, so their parameters are checked too.
PUBLIC_METHODS: dict[str, tuple[str, ...]] = {
    "push": ("self", "status"),
    "check_helo_needed": ("self", "helo"),
    "check_auth_needed": ("self", "caller_method"),
    "handle_exception": ("self", "error"),
    "challenge_auth": ("self", "challenge", "encode_to_b64", "log_client_response"),
    "smtp_MAIL": ("self", "arg"),
    "smtp_DATA": ("self", "arg"),
    "auth_PLAIN": ("self", "_", "args"),
    "auth_LOGIN": ("self", "_", "args"),
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "error"),
    "data_received": ("self", "data"),
    "eof_received": ("self",),
}
PUBLIC_ATTRIBUTES = (
    "line_length_limit",
    "local_part_limit",
    "AuthLoginUsernameChallenge",
    "AuthLoginPasswordChallenge",
)
# Members of aiosmtpd's SMTP that the gateway's session classes define on purpose.
OVERRIDDEN = {
    "line_length_limit",
    "push",  # silent after the last reply (the session lifetime's 421)
    "_getaddr",  # in smtp_compat only, as parse_address
    "connection_made",
    "connection_lost",
    "data_received",
    "eof_received",
    "handle_exception",
    "check_auth_needed",
    "smtp_MAIL",
    "smtp_DATA",
    "auth_PLAIN",
    "auth_LOGIN",
}
# Instance attributes the gateway's session adds; each must be new to aiosmtpd's SMTP.
SESSION_ATTRIBUTES = {
    "_listener",
    "_users",
    "_require_auth",
    "_admitted",
    "_in_data",
    "_auth_failures",
    "_max_session_seconds",
    "_data_timeout",
    "_committing",
    "_out_of_time",
    "_draining",
    "_lifetime",
    "_client",
}


def make_session(loop: asyncio.AbstractEventLoop) -> GatewaySMTP:
    """The gateway's session class, built as the listener builds it (no connection yet)."""
    handler = GatewayHandler((), None, offer_auth=False)  # type: ignore[arg-type]
    no_listener: Any = None
    return GatewaySMTP(handler, listener=no_listener, users=None, require_auth=False, loop=loop)


# -- the version gate ---------------------------------------------------------------------------


def test_installed_aiosmtpd_is_in_the_supported_range() -> None:
    assert aiosmtpd.__version__ == installed_version("aiosmtpd")
    check_aiosmtpd_version(aiosmtpd.__version__)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param("1.4.6", id="lowest"),
        pytest.param("1.4.6.post1", id="post-release"),
        pytest.param("1.4.12", id="later-patch"),
    ],
)
def test_version_check_accepts_the_range(version: str) -> None:
    check_aiosmtpd_version(version)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param("1.4.5", id="before-the-security-fixes"),
        pytest.param("1.4", id="minor-only"),
        pytest.param("1.5.0", id="next-minor"),
        pytest.param("1.5.0rc1", id="next-minor-pre-release"),
        pytest.param("2.0", id="next-major"),
        pytest.param("", id="empty"),
        pytest.param("unknown", id="not-a-version"),
    ],
)
def test_version_check_rejects_other_releases(version: str) -> None:
    with pytest.raises(UnsupportedAiosmtpdError) as caught:
        check_aiosmtpd_version(version)
    message = str(caught.value)
    assert f"aiosmtpd {version} is installed" in message
    assert SUPPORTED_TEXT in message and "smtp_compat" in message


def test_version_check_is_an_import_error() -> None:
    """Raised at import, so `gateway serve` stops before listening."""
    assert issubclass(UnsupportedAiosmtpdError, ImportError)


def test_pyproject_pins_the_range_the_compat_module_checks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["dependencies"] if d.startswith("aiosmtpd")]
    assert pin.replace(" ", "") == SUPPORTED_TEXT


# -- private and public members -----------------------------------------------------------------


def parameters(name: str) -> tuple[str, ...]:
    member = inspect.getattr_static(SMTP, name, None)
    assert member is not None, f"aiosmtpd.smtp.SMTP.{name} is gone"
    assert callable(member), f"aiosmtpd.smtp.SMTP.{name} is no longer a method"
    return tuple(inspect.signature(member).parameters)


@pytest.mark.parametrize(("name", "expected"), PRIVATE_METHODS.items(), ids=list(PRIVATE_METHODS))
def test_private_method_keeps_its_parameters(name: str, expected: tuple[str, ...]) -> None:
    assert parameters(name) == expected


@pytest.mark.parametrize(("name", "expected"), PUBLIC_METHODS.items(), ids=list(PUBLIC_METHODS))
def test_overridden_method_keeps_its_parameters(name: str, expected: tuple[str, ...]) -> None:
    assert parameters(name) == expected


@pytest.mark.parametrize("name", PUBLIC_ATTRIBUTES)
def test_class_attribute_exists(name: str) -> None:
    assert hasattr(SMTP, name)


def test_reader_is_stored_by_the_client_connected_callback() -> None:
    """`_reader` is an instance attribute: set where StreamReaderProtocol hands the reader over."""
    source = inspect.getsource(SMTP)
    assert "client_connected_cb=self._cb_client_connected" in source
    assert "self._reader = reader" in inspect.getsource(SMTP._cb_client_connected)


def test_address_parser_answers_in_the_shape_the_fast_path_copies() -> None:
    """`_getaddr` returns (address, rest), (None, None) if malformed, ('', '') if empty; the
    session's fast path for `<local@domain>` must agree with it on every simple address."""
    loop = asyncio.new_event_loop()
    try:
        plain = SMTP(object(), loop=loop)
        session = make_session(loop)
        for arg in ("<desk@gw.example>", " <a.b+c@x-y.example>  SIZE=100 BODY=8BITMIME", "<x@y>"):
            assert session.parse_address(arg) == plain._getaddr(arg)
        assert plain._getaddr("<desk@gw.example> SIZE=1") == ("desk@gw.example", "SIZE=1")
        assert plain._getaddr("<bad@@>") == (None, None)
        assert plain._getaddr("") == ("", "")
    finally:
        loop.close()


# -- a real loopback session through CompatSMTP -------------------------------------------------


class ProbeSMTP(CompatSMTP):
    """A CompatSMTP that exercises every fenced member from documented `smtp_*` commands."""

    parsed: list[str]

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        self.parsed.append(arg)
        return super().parse_address(arg)

    @syntax("XREAD")
    async def smtp_XREAD(self, arg: str) -> None:
        """Reads the next raw line through `stream_reader()` and echoes it."""
        await self.push("354 send a line")
        line = await self.stream_reader().readuntil(b"\r\n")
        await self.push("250 read " + line.decode("ascii").strip())

    @syntax("XSHORT")
    async def smtp_XSHORT(self, arg: str) -> None:
        """Answers only if `restart_idle_timer(0.2)` did not end the session first."""
        self.restart_idle_timer(0.2)
        await asyncio.sleep(1.0)  # inside the session's 1.5 s timeout, beyond the 0.2 s one
        await self.push("250 the short timeout did not apply")

    @syntax("XWAIT")
    async def smtp_XWAIT(self, arg: str) -> None:
        """Outlives the idle timeout only if `restart_idle_timer()` restarts it."""
        await asyncio.sleep(0.9)
        self.restart_idle_timer()
        await asyncio.sleep(0.9)
        await self.push("250 still here")


async def probe_session(scenario: Callable[[Any, Any], Awaitable[None]]) -> list[str]:
    parsed: list[str] = []
    loop = asyncio.get_running_loop()

    def factory() -> ProbeSMTP:
        session = ProbeSMTP(object(), hostname="probe", timeout=1.5, loop=loop)
        session.parsed = parsed
        return session

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await reply(reader)  # greeting
            await scenario(reader, writer)
        finally:
            writer.close()
    finally:
        server.close()
    return parsed


async def reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode("ascii")
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != "-":
            return line.rstrip("\r\n")


async def command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> str:
    writer.write(line.encode("ascii") + b"\r\n")
    return await reply(reader)


def test_stream_reader_reads_the_connection() -> None:
    async def scenario(reader: Any, writer: Any) -> None:
        assert (await command(reader, writer, "EHLO client")).startswith("250")
        assert (await command(reader, writer, "XREAD")).startswith("354")
        assert await command(reader, writer, "raw line") == "250 read raw line"

    asyncio.run(asyncio.wait_for(probe_session(scenario), 30))


def test_restart_idle_timer_extends_the_idle_timeout() -> None:
    async def scenario(reader: Any, writer: Any) -> None:
        assert await command(reader, writer, "XWAIT") == "250 still here"

    asyncio.run(asyncio.wait_for(probe_session(scenario), 30))


def test_restart_idle_timer_with_a_duration_applies_it_once() -> None:
    """DATA's own timeout: `_reset_timeout(duration)` arms the idle timer with `duration`."""

    async def scenario(reader: Any, writer: Any) -> None:
        with pytest.raises(ConnectionError):
            await command(reader, writer, "XSHORT")  # closed after 0.2 s, not the 1.5 s timeout

    asyncio.run(asyncio.wait_for(probe_session(scenario), 30))


def test_mail_and_rcpt_parse_addresses_through_parse_address() -> None:
    async def scenario(reader: Any, writer: Any) -> None:
        await command(reader, writer, "EHLO client")
        assert (await command(reader, writer, "MAIL FROM:<a@b.example>")).startswith("250")
        assert (await command(reader, writer, "RCPT TO:<c@d.example>")).startswith("250")

    parsed = asyncio.run(asyncio.wait_for(probe_session(scenario), 30))
    assert parsed == ["<a@b.example>", "<c@d.example>"]


# -- the introspection cache ------------------------------------------------------------------


def test_smtp_init_introspects_the_way_the_cache_expects() -> None:
    """The cache answers `getmembers` with `auth_*` members only and `dir` only with an
    argument; aiosmtpd.smtp must look them up as module globals for the cache to apply."""
    source = inspect.getsource(aiosmtpd_smtp)
    assert re.search(r"^import inspect$", source, re.MULTILINE)
    assert source.count("inspect.getmembers(") == 1
    assert re.search(r"inspect\.getmembers\(obj\)\s+if mname\.startswith\(\"auth_\"\)", source)
    assert "dir()" not in source
    assert "for m in dir(handler)" in source and "for m in dir(self)" in source


def test_cached_inspection_builds_the_same_session(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.new_event_loop()
    try:
        monkeypatch.setattr(aiosmtpd_smtp, "inspect", inspect)
        monkeypatch.delattr(aiosmtpd_smtp, "dir", raising=False)
        plain = make_session(loop)
        cached = _ClassCachedInspection()
        monkeypatch.setattr(aiosmtpd_smtp, "inspect", cached)
        monkeypatch.setattr(aiosmtpd_smtp, "dir", cached.dir, raising=False)
        for session in (make_session(loop), make_session(loop)):  # the second from the cache
            assert session._handle_hooks.keys() == plain._handle_hooks.keys()
            assert session._smtp_methods.keys() == plain._smtp_methods.keys()
            assert session._auth_methods.keys() == plain._auth_methods.keys()
            assert session._ehlo_hook_ver == plain._ehlo_hook_ver == "new"
    finally:
        loop.close()


def test_a_new_session_walks_only_the_names_aiosmtpd_collects() -> None:
    """Every connection's SMTP.__init__ walks `dir(handler)` and `dir(self)` for `handle_*` and
    `smtp_*` (and getmembers for `auth_*`): the cache answers with those names only, so each
    connection skips the other hundred (aiosmtpd filters by the same prefixes)."""
    source = inspect.getsource(aiosmtpd_smtp)
    assert 'for m in dir(handler)\n            if m.startswith("handle_")' in source
    assert 'for m in dir(self)\n            if m.startswith("smtp_")' in source
    loop = asyncio.new_event_loop()
    try:
        session = make_session(loop)
        cached = _ClassCachedInspection()
        names = cached.dir(session)
        assert names and all(n.startswith(("handle_", "smtp_", "auth_")) for n in names)
        assert {n for n in dir(session) if n.startswith("smtp_")} <= set(names)
    finally:
        loop.close()


def test_install_cached_inspection_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiosmtpd_smtp, "inspect", inspect)
    monkeypatch.setattr(aiosmtpd_smtp, "dir", dir, raising=False)
    smtp_compat.install_cached_inspection()
    first = aiosmtpd_smtp.inspect
    smtp_compat.install_cached_inspection()
    assert isinstance(first, _ClassCachedInspection) and aiosmtpd_smtp.inspect is first


# -- the session's own names --------------------------------------------------------------------


def test_session_members_override_only_what_they_mean_to() -> None:
    """A new aiosmtpd member with the name of one of ours would be silently replaced."""
    ours = {
        name
        for klass in GatewaySMTP.__mro__
        if klass not in SMTP.__mro__
        for name in vars(klass)
        if not name.startswith("__")
    }
    assert sorted(ours & set(dir(SMTP))) == sorted(OVERRIDDEN)


def test_session_attributes_are_new_to_aiosmtpd() -> None:
    loop = asyncio.new_event_loop()
    try:
        plain = SMTP(object(), loop=loop)
        session = make_session(loop)
        assert set(vars(session)) - set(vars(plain)) == SESSION_ATTRIBUTES
        assert not SESSION_ATTRIBUTES & set(dir(SMTP))
    finally:
        loop.close()
