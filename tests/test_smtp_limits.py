"""SMTP access control on a real listener on loopback: what the server reveals, who may send,
how password guessing is slowed and stopped, and how long one client may hold a slot."""

from __future__ import annotations

import platform

import aiosmtpd

from tests.test_smtp import (
    S220_READY,
    S250_OK,
    FakeSpool,
    Wire,
    listening,
    port_of,
    run,
    settings,
)

# -- item 16: no versions on the wire -------------------------------------------------------------


def test_no_reply_reveals_software_versions() -> None:
    """Banner, EHLO, HELP and error replies name no product version (aiosmtpd, Python)."""
    telltales = ("Python", "aiosmtpd", aiosmtpd.__version__, platform.python_version())
    commands = [
        "EHLO client",
        "HELO client",
        "HELP",
        "HELP MAIL",
        "NOOP",
        "VRFY postmaster",
        "XYZZY",
        "MAIL",
        "MAIL FROM:<a@helpdesk.example> BODY=WHATEVER",
        "RCPT TO:<nobody@nowhere.example>",
        "DATA now",
        "QUIT",
    ]

    async def scenario() -> None:
        async with listening(settings(), FakeSpool()) as listener:
            wire, greeting = await Wire.open(port_of(listener))
            assert greeting.code == S220_READY
            assert str(greeting) == "220 gateway.test ESMTP"
            replies = [greeting] + [await wire.cmd(line) for line in commands]
            await wire.close()
        for reply in replies:
            for telltale in telltales:
                assert telltale not in str(reply), (telltale, str(reply))
        assert replies[1].code == S250_OK

    run(scenario)
