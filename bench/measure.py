"""One measured load run through `gateway serve`: intake, end-to-end delivery, CPU, latency.

"Delivered" is end to end: the run counts until the gateway's backlog is empty (every job
decided, every outbox item delivered, read from its store) and delivered/s is the number of
mails over the time from the first mail sent to the last event that reached the PagerDuty
endpoint. The gateway's CPU is its process tree's (listener, worker and any children) over the
same span, from /proc.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.clients import SendResult, send_python
from bench.common import GatewayServer, TreeCpu
from bench.pd_sink import PdSink, Request
from bench.workload import Mail, mixed

Sender = Callable[[Sequence[bytes]], SendResult]


@dataclass(frozen=True)
class Run:
    mails: list[Mail]
    sent: SendResult
    drained: bool  # the backlog emptied before the timeout
    requests: list[Request]  # what reached the endpoint since the first mail was sent
    cpu: TreeCpu  # the gateway's, from the first mail to the empty backlog

    @property
    def last_event_at(self) -> float | None:
        return max((r.at for r in self.requests), default=None)

    @property
    def delivered_rate(self) -> float | None:
        """Mails per second end to end; None if nothing reached the endpoint."""
        last = self.last_event_at
        if last is None or not self.drained:
            return None
        return len(self.mails) / (max(last, self.sent.finished) - self.sent.started)

    def cpu_ms_per_mail(self, part: str = "total") -> float:
        return getattr(self.cpu, part) / len(self.mails) * 1000

    def latencies(self) -> tuple[list[float], int]:
        """End of DATA -> first POST of the mail's own event, for every mail that has one
        (new cases and resolves); and how many of those never arrived."""
        first: dict[tuple[str, str], float] = {}
        for request in sorted(self.requests, key=lambda r: r.at):
            first.setdefault((request.action, request.key), request.at)
        found, missing = [], 0
        for mail, sent_at in zip(self.mails, self.sent.sent_at, strict=True):
            if mail.event is None:
                continue
            if mail.event in first:
                found.append(first[mail.event] - sent_at)
            else:
                missing += 1
        return found, missing


def warm_up(gateway: GatewayServer, count: int = 200, timeout: float = 120.0) -> None:
    """First imports, connections and page cache, before anything is measured."""
    gateway.store  # noqa: B018 - open the benchmark's read connection before the load
    if count:
        send_python(gateway.port, [m.raw for m in mixed(count, "warm-up")], sessions=4)
    if not gateway.wait_idle(timeout):
        raise SystemExit(f"the gateway did not finish its warm-up within {timeout:.0f} s")


def run_load(
    gateway: GatewayServer, sink: PdSink, mails: list[Mail], send: Sender, timeout: float
) -> Run:
    before = gateway.cpu()
    sent = send([m.raw for m in mails])
    drained = gateway.wait_idle(timeout)
    cpu = gateway.cpu() - before
    requests = [r for r in sink.requests() if r.at >= sent.started]
    return Run(mails, sent, drained, requests, cpu)
