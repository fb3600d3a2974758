"""Schema versions: migrations are numbered, and a schema newer than this gateway is refused."""

from __future__ import annotations

import pytest

from gateway.errors import StoreError
from gateway.store import migrate_store
from tests.store_support import Backend, set_schema_version


def current_version(backend: Backend) -> int:
    if backend.name == "postgresql":
        from gateway.store.postgres.schema import MIGRATIONS
    else:
        from gateway.store.sqlite.schema import MIGRATIONS
    return len(MIGRATIONS)


def test_migrate_creates_the_schema_and_then_has_nothing_to_do(backend: Backend) -> None:
    assert migrate_store(backend.location)[1] == current_version(backend)
    assert migrate_store(backend.location) == (current_version(backend),) * 2


def test_a_schema_newer_than_this_gateway_is_refused(backend: Backend) -> None:
    backend.open().close()
    newer = current_version(backend) + 1
    set_schema_version(backend, newer)
    with pytest.raises(StoreError, match=f"schema version {newer} is newer"):
        backend.open()
    with pytest.raises(StoreError, match="is newer"):
        migrate_store(backend.location)
