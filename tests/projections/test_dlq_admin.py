"""``python -m projections dlq list | show | replay`` against the real Kafka."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from projections.dlq import DeadLetter, DeadLetterQueue

ROOT = Path(__file__).resolve().parents[2]
KAFKA = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092")


def cli(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TOPIC_PREFIX=prefix, PROJECTIONS_APP_ID=f"app-{prefix}")
    return subprocess.run([sys.executable, "-m", "projections", "dlq", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def source_records(topic: str) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": uuid.uuid4().hex, "enable.partition.eof": True})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    out, eof = [], set()
    while len(eof) < len(parts):
        for msg in consumer.consume(100, 1.0):
            if msg.error():
                eof.add(msg.partition())
            else:
                out.append(msg.value())
    consumer.close()
    return out


def test_dead_letters_are_listed_shown_and_replayed_once() -> None:
    prefix = f"dlq{uuid.uuid4().hex[:8]}"
    source = f"{prefix}.order.events"
    admin = AdminClient({"bootstrap.servers": KAFKA})
    admin.create_topics([NewTopic(source, 3, 1)])[source].result(30)
    letters = [
        DeadLetter(source, 1, 10 + i, b"42", orjson.dumps({"event_type": "OrderPlaced", "n": i}), "redis", "upcast",
                   "unknown event_version 9 of OrderPlaced", 3)
        for i in range(2)
    ]

    async def send() -> None:
        dlq = DeadLetterQueue(KAFKA)
        await dlq.send(letters)
        await dlq.stop()

    asyncio.run(send())

    listed = cli(prefix, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    report = orjson.loads(listed.stdout)
    assert report == {f"{source}.dlq": {"letters": 2, "errors": {"unknown event_version 9 of OrderPlaced": 2}}}

    shown = cli(prefix, "show", "order")
    assert shown.returncode == 0, shown.stderr
    rows = [orjson.loads(line) for line in shown.stdout.splitlines()]
    assert {r["source"] for r in rows} == {f"{source}:1:10", f"{source}:1:11"}
    assert all(r["stage"] == "upcast" and r["attempts"] == "3" for r in rows)

    first = cli(prefix, "replay", "order")
    assert first.returncode == 0 and "replayed 2 letters" in first.stdout, first.stderr
    again = cli(prefix, "replay", "order")
    assert "replayed 0 letters" in again.stdout, again.stderr
    assert sorted(source_records(source)) == sorted(letter.value for letter in letters)


def test_an_unknown_dead_letter_topic_is_a_clear_error() -> None:
    result = cli(f"none{uuid.uuid4().hex[:6]}", "show", "order")
    assert result.returncode == 1
    assert "no dead-letter topic" in result.stderr and "Traceback" not in result.stderr
