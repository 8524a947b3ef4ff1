"""Domain events: the contract between cdc/ (producer) and projections/ (consumers).

DESIGN.md "The event contract" is the specification; docs/events.md is the
catalogue. This module is the only place that knows the wire form, so
producers and consumers cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from cdc.lsn import format_lsn, parse_lsn

__all__ = [
    "SNAPSHOT_K",
    "TABLE_WIDE_ID",
    "DecodeError",
    "DomainEvent",
    "Watermark",
    "decode_record",
    "encode_event",
    "encode_watermark",
    "event_from_dict",
    "format_occurred_at",
    "snapshot_event_id",
    "streamed_event_id",
    "topic_for",
]

# Aggregate id of events about a whole table (TableTruncated): no row is meant.
# The publisher should send such events to every partition, like Watermarks.
TABLE_WIDE_ID = "*"
# k of snapshot reads: version = (snapshot_lsn << 16) | 0, below every streamed
# event of the same commit position (those use k >= 1).
SNAPSHOT_K = 0


@dataclass(slots=True)
class DomainEvent:
    """One domain event; `changes` are the Debezium-style envelopes it covers."""

    event_id: str
    event_type: str
    event_version: int
    aggregate_type: str
    aggregate_id: str
    version: int
    occurred_at: str
    commit_lsn: int
    data: dict[str, Any]
    changes: list[dict[str, Any]]

    @property
    def table_wide(self) -> bool:
        """True for events about a whole table (truncate): publish to every partition."""
        return self.aggregate_id == TABLE_WIDE_ID

    def to_dict(self) -> dict[str, Any]:
        """The wire form as a dict (LSNs as "X/Y")."""
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "event_version": self.event_version,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "version": self.version,
            "occurred_at": self.occurred_at,
            "commit_lsn": format_lsn(self.commit_lsn),
            "data": self.data,
            "changes": self.changes,
        }


@dataclass(slots=True, frozen=True)
class Watermark:
    """All transactions committed at or before `lsn` have been published."""

    lsn: int
    ts_ms: int


class DecodeError(ValueError):
    """A Kafka value that is neither a domain event nor a Watermark."""


def topic_for(aggregate_type: str, prefix: str = "shop") -> str:
    """One topic per aggregate: ``shop.order.events``."""
    return f"{prefix}.{aggregate_type}.events"


def streamed_event_id(commit_lsn: int, first_seq: int) -> str:
    """Id of a streamed event: its commit LSN and the seq of the first change it covers.

    Every change is covered by exactly one event, so no two events share a
    first change; a replay of the same transaction yields the same ids.
    """
    return f"{format_lsn(commit_lsn)}:{first_seq}"


def snapshot_event_id(snapshot_lsn: int, schema: str, table: str, key: list[Any]) -> str:
    """Id of a snapshot read: the snapshot LSN, the table and the row's key (a JSON array)."""
    return f"{format_lsn(snapshot_lsn)}:r:{schema}.{table}:{orjson.dumps(key).decode()}"


def format_occurred_at(ts_ms: int) -> str:
    """ms since the epoch -> ``2026-11-26T06:44:07.123Z``."""
    seconds, ms = divmod(ts_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


# The events of one transaction share their commit LSN: format it once. One
# tuple swapped as a whole, so concurrent callers never pair an LSN with another's text.
_last_lsn: tuple[int, str] = (-1, "")


def encode_event(event: DomainEvent) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record: aggregate id (utf-8) and the event as JSON."""
    global _last_lsn
    last = _last_lsn
    if event.commit_lsn != last[0]:
        last = _last_lsn = (event.commit_lsn, format_lsn(event.commit_lsn))
    return event.aggregate_id.encode(), orjson.dumps(
        {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "event_version": event.event_version,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "version": event.version,
            "occurred_at": event.occurred_at,
            "commit_lsn": last[1],
            "data": event.data,
            "changes": event.changes,
        }
    )


def encode_watermark(lsn: int, ts_ms: int) -> bytes:
    """The value of a Watermark record (written to every partition of every topic)."""
    return orjson.dumps({"event_type": "Watermark", "lsn": format_lsn(lsn), "ts_ms": ts_ms})


_FIELDS = (
    ("event_id", str),
    ("event_type", str),
    ("event_version", int),
    ("aggregate_type", str),
    ("aggregate_id", str),
    ("version", int),
    ("occurred_at", str),
    ("commit_lsn", str),
    ("data", dict),
    ("changes", list),
)


def event_from_dict(obj: dict[str, Any]) -> DomainEvent:
    """The wire dict -> DomainEvent, checking every field (for consumers that decoded JSON already)."""
    for name, kind in _FIELDS:
        value = obj.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DecodeError(
                f"domain event field {name!r} is {value!r}, expected {kind.__name__} "
                f"(event_type={obj.get('event_type')!r}); is the producer on the event "
                "contract of DESIGN.md?"
            )
    try:
        commit_lsn = parse_lsn(obj["commit_lsn"])
    except ValueError as exc:
        raise DecodeError(f"domain event field 'commit_lsn': {exc}") from None
    return DomainEvent(
        event_id=obj["event_id"],
        event_type=obj["event_type"],
        event_version=obj["event_version"],
        aggregate_type=obj["aggregate_type"],
        aggregate_id=obj["aggregate_id"],
        version=obj["version"],
        occurred_at=obj["occurred_at"],
        commit_lsn=commit_lsn,
        data=obj["data"],
        changes=obj["changes"],
    )


def decode_record(value: bytes) -> DomainEvent | Watermark:
    """A Kafka value -> DomainEvent or Watermark; DecodeError names what was wrong."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(
            f"record value is not JSON ({exc}); expected a domain event or a Watermark "
            f"(first bytes: {bytes(value[:60])!r})"
        ) from None
    if not isinstance(obj, dict):
        raise DecodeError(
            f"record value is a JSON {type(obj).__name__}, expected an object "
            "(a domain event or a Watermark)"
        )
    if obj.get("event_type") == "Watermark":
        lsn, ts_ms = obj.get("lsn"), obj.get("ts_ms")
        if not isinstance(lsn, str) or not isinstance(ts_ms, int):
            raise DecodeError(f"Watermark record needs lsn 'X/Y' and ts_ms int, got {obj!r}")
        try:
            return Watermark(parse_lsn(lsn), ts_ms)
        except ValueError as exc:
            raise DecodeError(f"Watermark record: {exc}") from None
    return event_from_dict(obj)
