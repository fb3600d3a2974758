"""The bridge from asyncio to the store: calls run on one dedicated thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.store.backend import open_store
from gateway.store.protocols import Store

T = TypeVar("T")


class StoreThread:
    """Runs store calls on one dedicated thread, for asyncio code (the loop never blocks on fsync)."""

    def __init__(self, db_path: str | Path, name: str = "store", *, durable: bool = True) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._store = self._executor.submit(open_store, db_path, durable=durable).result()

    async def call(self, fn: Callable[[Store], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self._store)

    def close(self) -> None:
        self._executor.submit(self._store.close).result()
        self._executor.shutdown()
