"""Fixtures of the store contract: one fresh, empty database per test, for every backend.

Adding a backend is adding its name to `BACKENDS` and a branch in `backend` that yields a
`Backend` for a fresh database (PostgreSQL: a new database on the test server).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import Store
from tests.store_support import Backend

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        opened = Backend("sqlite", tmp_path / "db" / "gateway.sqlite3")
    elif request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        opened = Backend("postgresql", server.new_database())
    else:  # pragma: no cover - a backend listed without a fixture branch
        raise AssertionError(f"no fixture for backend {request.param!r}")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()
