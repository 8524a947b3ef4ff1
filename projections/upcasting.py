"""Upcasting: events of an older `event_version` are brought to the current shape before apply.

A registry maps (event_type, from_version) to a function turning that
version's `data` into the next version's. An event is upcast one step at a
time until it reaches the current version of its type, so every old shape
only ever needs one function, written when its successor was introduced.
The sinks therefore see one shape per type, whatever the topic still holds.

An event newer than what this consumer knows, or an old version without a
path to the current one, cannot be applied safely: `UpcastError` sends it to
the dead-letter topic (projections/dlq.py) instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cdc.events import DomainEvent
from cdc.rules import EVENT_TYPES

__all__ = ["UPCASTERS", "UpcastError", "Upcasters"]

Data = dict[str, Any]
Step = Callable[[Data, DomainEvent], Data]


class UpcastError(ValueError):
    """The event's version cannot be brought to the shape this consumer applies."""


class Upcasters:
    """The registry: (event_type, from_version) -> step to from_version + 1."""

    def __init__(self, producer_versions: dict[str, int] | None = None) -> None:
        self._steps: dict[tuple[str, int], Step] = {}
        # The producer's catalogue: a type is at least at the version cdc emits.
        self._current: dict[str, int] = dict(producer_versions or {})

    def register(self, event_type: str, from_version: int) -> Callable[[Step], Step]:
        """Decorator: `fn(data, event) -> data` of version from_version + 1."""

        def add(step: Step) -> Step:
            key = (event_type, from_version)
            if key in self._steps:
                raise ValueError(
                    f"an upcaster for {event_type} v{from_version} is registered twice"
                )
            self._steps[key] = step
            self._current[event_type] = max(self._current.get(event_type, 1), from_version + 1)
            return step

        return add

    def current(self, event_type: str) -> int:
        """The version this consumer applies (1 for types it has no history of)."""
        return self._current.get(event_type, 1)

    def upcast(self, event: DomainEvent) -> DomainEvent:
        """The event at the current version of its type (the same object when it already is)."""
        target = self._current.get(event.event_type, 1)
        version = event.event_version
        if version == target:
            return event
        if version > target or version < 1:
            raise UpcastError(
                f"{event.event_type} event_version {version} is unknown here (this consumer "
                f"applies up to v{target}); deploy a projections release that knows it, then "
                "replay the dead letter"
            )
        data = event.data
        while version < target:
            step = self._steps.get((event.event_type, version))
            if step is None:
                raise UpcastError(
                    f"no upcaster from {event.event_type} v{version} to v{version + 1} "
                    f"(current is v{target}); register one in projections/upcasting.py"
                )
            try:
                data = step(data, event)
            except Exception as exc:
                raise UpcastError(
                    f"upcasting {event.event_type} v{version} -> v{version + 1} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            version += 1
        return replace(event, event_version=version, data=data)


UPCASTERS = Upcasters({name: spec.version for name, spec in EVENT_TYPES.items()})


_PAYMENT_FIELDS = ("payment_id", "amount", "method", "provider_ref")


@UPCASTERS.register("OrderPaid", 1)
def _order_paid_v1_to_v2(data: Data, event: DomainEvent) -> Data:
    """OrderPaid v2 groups the capture into `payment` (null when no capture row came with it).

    v1: {order_id, status, previous_status, paid_at, currency, total,
         payment_id, amount, method, provider_ref}
    v2: {order_id, status, previous_status, paid_at, currency, total,
         payment: {payment_id, amount, method, provider_ref} | null}
    """
    out = {k: v for k, v in data.items() if k not in _PAYMENT_FIELDS}
    if data.get("payment_id") is None:
        out["payment"] = None
    else:
        out["payment"] = {k: data.get(k) for k in _PAYMENT_FIELDS}
    return out
