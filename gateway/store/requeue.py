"""When a dead letter may go back in the queue: the rule every backend's `retry_outbox` applies.

A re-queued item becomes the oldest pending item of its order key, so it is sent before the
key's later items that are still waiting. That keeps the order only while none of them has
gone out yet: re-sending a dead trigger after its resolve was delivered reopens nothing in
the local mirror but leaves the PagerDuty incident open for good. So an item is refused
while a later item of its key was delivered or is in flight; `force` overrides that (and the
caller warns), never the other refusals (no such item, not a dead letter).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.records import OutboxItem


@dataclass(frozen=True)
class Refusal:
    """Why one item was not re-queued; `overridable`: `force` would re-queue it anyway."""

    item: int
    reason: str
    overridable: bool = False


@dataclass(frozen=True)
class Requeued:
    """What `retry_outbox` did: the items put back in the queue, those refused with the
    reason, and those re-queued by `force` against the order rule (with what it overrode)."""

    requeued: tuple[int, ...] = ()
    refused: tuple[Refusal, ...] = ()
    forced: tuple[Refusal, ...] = ()


def not_requeueable(wanted: int, item: OutboxItem | None) -> Refusal | None:
    """Refuse a missing item or one that is not a dead letter; None when it is one."""
    if item is None:
        return Refusal(wanted, f"no outbox item #{wanted}")
    if item.state == "dead":
        return None
    doing = "was delivered" if item.state == "done" else "is still pending (not dead)"
    return Refusal(item.id, f"#{item.id} ({item.describe()}) {doing}: nothing to retry")


def out_of_order(item: OutboxItem, later: OutboxItem | None) -> Refusal | None:
    """Refuse a dead letter whose key has moved on: `later` is its key's first later item
    that was delivered or is in flight (None: the item may go ahead of the rest)."""
    if later is None:
        return None
    what = "was already delivered" if later.state == "done" else "is being delivered right now"
    return Refusal(
        item.id,
        f"#{item.id} ({item.describe()}) would be sent after #{later.id} ({later.describe()})"
        f" of the same key, which {what}: out of order (a trigger after its resolve leaves"
        " the PagerDuty incident open); --force sends it anyway",
        overridable=True,
    )
