"""`WebServer`: uvicorn serving the web app on the service's own event loop.

The listening sockets are bound here first, so a taken port is an `OSError` the caller logs and
survives (uvicorn binding them itself would `sys.exit`). uvicorn then serves those sockets as a
task on the running loop: no thread, no child process. It keeps quiet: no access log, no logging
configuration of its own, no `Server` header, and only its errors reach the gateway's log.
Every limit is in `Limits`; `gateway.web.uvicorn_compat` explains what uvicorn is made to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from gateway.config import split_hostport
from gateway.web.hardening import Limits
from gateway.web.uvicorn_compat import EmbeddedServer, GatewayProtocol

log = logging.getLogger(__name__)

BACKLOG = 128
SHUTDOWN_GRACE_SECONDS = 5  # requests in flight at shutdown get this long to finish


class WebServer:
    """`await start()` binds `listen` (host:port) and serves `app`; `await close()` stops it."""

    def __init__(self, listen: str, app: ASGIApp, limits: Limits | None = None) -> None:
        self.listen = listen
        self.app = app
        self.limits = limits or Limits()
        self.bound: list[tuple[str, int]] = []
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        host, port = split_hostport(self.listen)
        sockets = await bind(host, port)
        server = EmbeddedServer(self._config())
        task = asyncio.create_task(server.serve(sockets=sockets), name="web")
        while not server.started:  # uvicorn has no "started" event to await
            if task.done():
                for sock in sockets:
                    sock.close()
                task.result()  # raises what stopped it
                raise RuntimeError("the web server stopped while starting")
            await asyncio.sleep(0.005)
        self.bound = [sock.getsockname()[:2] for sock in sockets]
        self._server, self._task = server, task

    async def close(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("web server stopped with an error")
        self._server = self._task = None

    def _config(self) -> uvicorn.Config:
        limits = self.limits
        return uvicorn.Config(
            self.app,
            lifespan="off",  # the service starts and stops what the app uses
            http=GatewayProtocol.with_limits(limits),
            ws="none",
            h11_max_incomplete_event_size=limits.max_header_bytes,
            backlog=BACKLOG,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            proxy_headers=False,  # nothing here depends on the client's address or scheme
            server_header=False,
            access_log=False,
            log_config=None,  # the gateway's logging stays as it is
            log_level=logging.ERROR,  # uvicorn's own lines: errors only
        )


async def bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` ('' = all), as asyncio would bind them."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sockets.append(socket.create_server(address, family=family, backlog=BACKLOG))
    except OSError:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return sockets
