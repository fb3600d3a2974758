"""The incidents a batch acts on, as its transaction holds them: read once under their locks,
written once at the end of the batch.

On PostgreSQL each statement is a round trip: locking, reading and writing each job's incident
on its own cost four per job. `BatchIncidents` locks and reads all of a batch's incidents in
two statements (`DecisionStore.lock_incidents`), keeps them as the batch's jobs change them, and
writes those that changed in one (`save_incidents`), with the repeats absorbed per incident in
one more each. `OneByOne` is the same interface job by job: the careful redo of a batch, where a
job's own savepoint must undo its writes at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.store import DecisionStore, Incident

Slot = tuple[str, str]  # (service, incident key)


class HeldIncidents(Protocol):
    def incident(self, slot: Slot) -> Incident | None:
        """The incident as this transaction holds it, under its lock."""
        ...

    def save(self, incident: Incident) -> None: ...

    def note_repeat(self, slot: Slot, at: float, details: dict[str, object]) -> None:
        """A repeat trigger absorbed by the outbox, counted on the (open) incident."""
        ...

    def write(self) -> None:
        """Everything saved and noted, into the store (before the commit)."""
        ...


@dataclass
class _Repeats:
    count: int
    at: float
    details: dict[str, object]


class BatchIncidents:
    """A batch's incidents, locked and read up front, written at the end (`write`)."""

    def __init__(self, store: DecisionStore, slots: Sequence[Slot]) -> None:
        self.store = store
        found = store.lock_incidents(slots)
        self._current: dict[Slot, Incident | None] = {slot: found.get(slot) for slot in slots}
        self._changed: dict[Slot, None] = {}  # in the order the batch changed them
        self._repeats: dict[Slot, _Repeats] = {}

    def incident(self, slot: Slot) -> Incident | None:
        if slot in self._current:
            return self._current[slot]
        return self.store.incident(*slot)  # not one of the batch's: lock and read it now

    def save(self, incident: Incident) -> None:
        slot = (incident.service, incident.incident_key)
        before = self._current.get(slot)
        if before is None or before.times_opened != incident.times_opened:
            # opened (again): the store resets the repeat count of the episode before, which
            # the repeats noted so far in this batch belong to
            self._repeats.pop(slot, None)
        self._current[slot] = incident
        self._changed[slot] = None

    def note_repeat(self, slot: Slot, at: float, details: dict[str, object]) -> None:
        noted = self._repeats.get(slot)
        self._repeats[slot] = _Repeats((noted.count if noted else 0) + 1, at, details)

    def write(self) -> None:
        incidents = [self._current[slot] for slot in self._changed]
        self.store.save_incidents([i for i in incidents if i is not None])
        for (service, key), noted in self._repeats.items():
            self.store.note_coalesced(service, key, noted.at, noted.details, noted.count)
        self._changed.clear()
        self._repeats.clear()


class OneByOne:
    """Each read locks its incident, each write goes to the store at once."""

    def __init__(self, store: DecisionStore) -> None:
        self.store = store

    def incident(self, slot: Slot) -> Incident | None:
        return self.store.incident(*slot)

    def save(self, incident: Incident) -> None:
        self.store.save_incident(incident)

    def note_repeat(self, slot: Slot, at: float, details: dict[str, object]) -> None:
        self.store.note_coalesced(slot[0], slot[1], at, details)

    def write(self) -> None:
        """Nothing waits."""
