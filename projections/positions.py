"""How far a projection has read: per Kafka partition, the next offset and the
newest Watermark LSN seen there. Stored with the projection's writes, so what a
view shows and how far it has read can never disagree (eventsourcing's tracking
records do the same)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Position", "PositionKey", "min_watermark"]

PositionKey = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class Position:
    offset: int  # next offset to consume after the batch
    watermark: int  # LSN of the newest Watermark record seen in the partition (0 if none)


def min_watermark(
    positions: dict[PositionKey, Position], expected: set[PositionKey] | None = None
) -> int:
    """The projection's watermark: the minimum over its partitions, `expected` (those in
    `positions` when not known). A partition not seen yet counts as 0, so the watermark
    cannot run ahead of it, and a position of another partition of the same topics counts
    too (one added to a topic since `expected` was read). Positions of other topics do not
    count: a rebuild reads every topic with one consumer and stores the positions of all
    of them in each new generation, so the Redis views' hold the product topic's too,
    which the live Redis pipeline never reads, so never moves."""
    if not expected:
        keys = set(positions)
    else:
        topics = {topic for topic, _ in expected}
        keys = expected | {k for k in positions if k[0] in topics}
    if not keys:
        return 0
    return min(positions[k].watermark if k in positions else 0 for k in keys)
