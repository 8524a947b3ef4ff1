"""Operating the dead-letter topics: ``python -m projections dlq list | show | replay``.

Replay re-produces each letter's original key and value to the topic it came
from (header ``dlq.source.topic``), so the fixed projection applies it like
any other event; the version guards make a replay of something already
applied harmless. Progress is kept as the committed offsets of the consumer
group ``<app id>.dlq-replay``, so a second replay sends only letters that
arrived since.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

__all__ = ["Letter", "count_letters", "dlq_topics", "read_letters", "replay"]


@dataclass(frozen=True, slots=True)
class Letter:
    dlq_topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def source_topic(self) -> str:
        return self.headers.get("dlq.source.topic") or self.dlq_topic.removesuffix(".dlq")

    def describe(self) -> dict[str, Any]:
        h = self.headers
        return {
            "dlq": f"{self.dlq_topic}:{self.partition}:{self.offset}",
            "source": f"{h.get('dlq.source.topic')}:{h.get('dlq.source.partition')}:{h.get('dlq.source.offset')}",
            "projection": h.get("dlq.projection"),
            "stage": h.get("dlq.stage"),
            "attempts": h.get("dlq.attempts"),
            "failed_at": h.get("dlq.failed_at"),
            "error": h.get("dlq.error"),
            "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
            "value": self.value.decode("utf-8", "replace") if self.value is not None else None,
        }


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )


def dlq_topics(bootstrap: str, prefix: str) -> list[str]:
    consumer = _consumer(bootstrap, "readside-dlq-admin")
    try:
        meta = consumer.list_topics(timeout=10)
    except KafkaException as exc:
        raise ConnectionError(f"Kafka at {bootstrap} did not answer: {exc}") from None
    finally:
        consumer.close()
    return sorted(t for t in meta.topics if t.startswith(f"{prefix}.") and t.endswith(".dlq"))


def _letter(msg: Message) -> Letter:
    headers: dict[str, str] = {}
    for k, v in msg.headers() or []:  # type: ignore[str-unpack]
        headers[str(k)] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or "")
    return Letter(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0), msg.key(), msg.value(), headers)


def _drain(consumer: Consumer, parts: list[TopicPartition], limit: int | None) -> list[Letter]:
    """Every record from the assigned positions to the end of each partition."""
    out: list[Letter] = []
    live = {(tp.topic, tp.partition) for tp in parts}
    deadline = time.monotonic() + 60
    while live and (limit is None or len(out) < limit) and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            err = msg.error()
            if err is not None:
                if err.code() == -191:  # _PARTITION_EOF
                    live.discard((msg.topic(), msg.partition()))
                    continue
                raise ConnectionError(f"reading {msg.topic()}: {err.str()}")
            out.append(_letter(msg))
    return out[:limit] if limit is not None else out


def _partitions(consumer: Consumer, topic: str) -> list[TopicPartition]:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise LookupError(f"no dead-letter topic {topic}")
    return [TopicPartition(topic, p) for p in sorted(meta.partitions)]


def count_letters(bootstrap: str, topic: str) -> tuple[int, Counter[str]]:
    """(how many letters, how many per error's first line)."""
    letters = read_letters(bootstrap, topic)
    errors = Counter((letter.headers.get("dlq.error") or "?").splitlines()[0][:120] for letter in letters)
    return len(letters), errors


def read_letters(bootstrap: str, topic: str, limit: int | None = None) -> list[Letter]:
    consumer = _consumer(bootstrap, "readside-dlq-admin")
    try:
        parts = _partitions(consumer, topic)
        consumer.assign([TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in parts])
        return _drain(consumer, parts, limit)
    finally:
        consumer.close()


def replay(bootstrap: str, topic: str, group: str) -> int:
    """Re-produce the letters not replayed yet to their source topics; returns how many."""
    consumer = _consumer(bootstrap, group)
    # murmur2, like cdc's producer (and Java's): a replayed event lands on its aggregate's partition
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "partitioner": "murmur2_random"})
    try:
        parts = _partitions(consumer, topic)
        committed = consumer.committed(parts, timeout=10)
        consumer.assign(
            [TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING) for tp in committed]
        )
        letters = _drain(consumer, parts, None)
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in letters:
            while True:
                try:
                    producer.produce(letter.source_topic, letter.value, letter.key, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        left = producer.flush(60)
        if left or failures:
            raise ConnectionError(
                f"{left} letters not acknowledged, {len(failures)} refused ({failures[:1]}); nothing was "
                "marked as replayed, so the next replay sends them again"
            )
        # only now: a crash before this point replays the same letters again (harmless)
        ends: dict[int, int] = {}
        for letter in letters:
            ends[letter.partition] = max(ends.get(letter.partition, -1), letter.offset + 1)
        if ends:
            consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in ends.items()], asynchronous=False)
        return len(letters)
    finally:
        consumer.close()
