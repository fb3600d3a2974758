"""Loopback ports for test servers; the benchmarks use the same helper."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; a race is possible but rare)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
