"""The parent's pipe to the worker: wake-ups are coalesced under load, and none is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from gateway.runtime.reload import load_generation
from gateway.runtime.worker import WorkerProcess
from tests.conftest import ROOT


class GatedPipe:
    """Records what is sent; the first send blocks until the gate opens (a busy pipe)."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.gate = threading.Event()

    def send(self, message: object) -> None:
        if not self.sent:
            self.sent.append(message)
            self.gate.wait(10)
            return
        self.sent.append(message)


def test_wakes_queued_behind_a_busy_pipe_collapse_into_one(tmp_path: Path) -> None:
    worker = WorkerProcess(
        tmp_path / "g.sqlite3", load_generation(ROOT / "config.toml").for_worker()
    )
    pipe = GatedPipe()
    worker._pipe = pipe  # type: ignore[assignment]
    worker._writer.start()
    try:
        worker.wake()  # taken by the writer thread, which then blocks in send()
        deadline = time.monotonic() + 10
        while not pipe.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(500):  # 500 commits while the pipe is busy
            worker.wake()
        pipe.gate.set()
        while len(pipe.sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        while not worker._outgoing.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pipe.sent == ["wake", "wake"]  # the 500 became one, sent after all of them
        worker.wake()  # and a later commit wakes again
        while len(pipe.sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pipe.sent == ["wake", "wake", "wake"]
    finally:
        worker._outgoing.put(None)
        worker._writer.join(5)
