"""Dead letters: records a projection cannot apply go to ``<topic>.dlq`` and the pipeline moves on.

The dead letter keeps the original key and value byte for byte (so replaying
it once the cause is fixed is a plain re-produce to the source topic), and
says why in headers:

    dlq.projection        redis | clickhouse  (the projection that gave up on it)
    dlq.stage             decode | upcast | apply
    dlq.error             what went wrong (at most 4000 characters)
    dlq.attempts          how many times it was tried
    dlq.source.topic      where it came from ...
    dlq.source.partition  ...
    dlq.source.offset     ... (so it can be found and skipped or replayed)
    dlq.failed_at         UTC, ISO 8601

The producer is idempotent (acks=all), and `send` returns only once Kafka
has acknowledged every letter: the batch's offsets are committed after that,
so a crash never loses a dead letter (it may write one twice; the source
offset header tells the copies apart).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

__all__ = ["DeadLetter", "DeadLetterQueue", "dlq_topic", "letter_headers"]

log = logging.getLogger(__name__)

# the same settings as the event topics (cdc/publisher.py): kept, never compacted
TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
_MAX_ERROR = 4000


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    projection: str
    stage: str  # decode | upcast | apply
    error: str
    attempts: int


def letter_headers(
    letter: DeadLetter, failed_at: datetime | None = None
) -> list[tuple[str, bytes]]:
    moment = (
        (failed_at or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    return [
        ("dlq.projection", letter.projection.encode()),
        ("dlq.stage", letter.stage.encode()),
        ("dlq.error", letter.error[:_MAX_ERROR].encode()),
        ("dlq.attempts", str(letter.attempts).encode()),
        ("dlq.source.topic", letter.topic.encode()),
        ("dlq.source.partition", str(letter.partition).encode()),
        ("dlq.source.offset", str(letter.offset).encode()),
        ("dlq.failed_at", moment.encode()),
    ]


class DeadLetterQueue:
    """Produces dead letters; creates ``<topic>.dlq`` on first use (same partition count)."""

    def __init__(self, bootstrap: str, *, client_id: str = "readside-projections-dlq") -> None:
        self.bootstrap = bootstrap
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._ready: set[str] = set()

    async def start(self) -> None:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                enable_idempotence=True,
                acks="all",
                linger_ms=5,
                max_request_size=16 * 1024 * 1024,
            )
            await producer.start()
            self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _ensure_topic(self, source: str) -> None:
        name = dlq_topic(source)
        if name in self._ready:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id=self.client_id)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            if name not in existing:
                partitions = 1
                if source in existing:
                    described = await admin.describe_topics([source])
                    partitions = max(1, len(described[0].get("partitions", ())))
                try:
                    await admin.create_topics(
                        [NewTopic(name, partitions, 1, topic_configs=TOPIC_CONFIG)]
                    )
                    log.info("created dead-letter topic %s (%d partitions)", name, partitions)
                except TopicAlreadyExistsError:
                    pass
        finally:
            await admin.close()
        self._ready.add(name)

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Produce the letters and wait until Kafka has acknowledged all of them."""
        if not letters:
            return
        await self.start()
        assert self._producer is not None
        for source in {letter.topic for letter in letters}:
            await self._ensure_topic(source)
        now = datetime.now(UTC)
        futures = [
            await self._producer.send(
                dlq_topic(letter.topic),
                value=letter.value,
                key=letter.key,
                headers=letter_headers(letter, now),
            )
            for letter in letters
        ]
        for future in futures:
            await future
