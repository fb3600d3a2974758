"""The baseline for every benchmark: a bare aiosmtpd handler that accepts and does nothing.

Same server settings the gateway uses (own event loop, uvloop when installed), no durability,
no parsing: `python bench/bare_smtpd.py PORT`. Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP


class NullHandler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses) -> list[str]:
        """Offers PIPELINING, as the gateway does: the same dialogue with the same clients."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 Ok: discarded"


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import serve_on_port  # noqa: E402


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(NullHandler(), hostname="bare", data_size_limit=64 * 1024 * 1024),
        "127.0.0.1",
        port,
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    serve_on_port(serve)
