"""The baseline for every benchmark: a bare aiosmtpd handler that accepts and does nothing.

Same server settings the gateway uses (own event loop, uvloop when installed), no durability,
no parsing: `python bench/bare_smtpd.py PORT`. Runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from aiosmtpd.smtp import SMTP


class NullHandler:
    async def handle_DATA(self, server, session, envelope) -> str:
        return "250 2.0.0 Ok: discarded"


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
    try:
        import uvloop

        uvloop.run(serve(int(sys.argv[1])))
    except ImportError:
        asyncio.run(serve(int(sys.argv[1])))
