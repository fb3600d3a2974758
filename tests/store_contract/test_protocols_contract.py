"""The backend implements every protocol method with the protocol's own parameters."""

from __future__ import annotations

import inspect

import pytest

from gateway.store import protocols
from gateway.store.protocols import Store

PROTOCOLS = [
    protocols.SpoolStore,
    protocols.DecisionStore,
    protocols.OutboxStore,
    protocols.ImapStore,
    protocols.ReportStore,
    protocols.HeartbeatStore,
    protocols.PagerDutyWebhookStore,
    protocols.Store,
]


def members(protocol: type) -> list[str]:
    return sorted(
        name
        for cls in protocol.__mro__
        if cls not in (object,) and getattr(cls, "_is_protocol", False)
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_")
    )


def parameters(function: object) -> list[tuple[str, object, object]]:
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_every_protocol_method_is_implemented_alike(store: Store, protocol: type) -> None:
    for name in members(protocol):
        implemented = getattr(type(store), name, None)
        assert implemented is not None, f"{type(store).__name__} lacks {name}"
        assert parameters(implemented) == parameters(getattr(protocol, name)), name
