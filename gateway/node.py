"""This node's name: which gateway process accepted and delivered each mail.

Several nodes can share one PostgreSQL store; the status page and /metrics say which one did
what. The name is `[store] node` from the config, else the host name; `serve` (and its worker
process) set it once at start, every other command keeps the host name unless configured.
"""

from __future__ import annotations

import socket

_configured: str = ""


def set_node(name: str) -> None:
    """Name this process's node ('' goes back to the host name)."""
    global _configured
    _configured = name


def this_node() -> str:
    return _configured or socket.gethostname()
