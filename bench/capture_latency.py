"""Steady state: the capture at ~2,000 row changes/s from a writer; latency from
commit to the event being readable from Kafka (an upper bound on commit ->
Kafka-acknowledged, since a record is readable only after it is acknowledged).
Prints a JSON summary.

    python -m bench.capture_latency [--rate 2000] [--duration 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import psycopg
from confluent_kafka import Consumer, TopicPartition

from bench.capture_drain import DB, dsn_for

ROOT = Path(__file__).resolve().parent.parent
KAFKA = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092")
CHANGES_PER_TX = 5  # an order and its four items


def drive(dsn: str, rate: float, duration: float, stop: threading.Event, done: list[int]) -> None:
    tx_rate = rate / CHANGES_PER_TX
    with psycopg.connect(dsn, autocommit=True) as c:
        start = time.perf_counter()
        n = 0
        while not stop.is_set():
            due = start + n / tx_rate
            now = time.perf_counter()
            if now - start > duration:
                break
            if due > now:
                time.sleep(due - now)
            with c.transaction():
                c.execute(
                    """with o as (insert into orders (customer_id, status, currency, subtotal, tax, shipping_fee, total, shipping_address)
                                  values (1 + %s %% 1000, 'pending', 'EUR', 39.96, 0, 0, 39.96, '{}') returning id)
                       insert into order_items (order_id, line_no, product_id, quantity, unit_price, line_total)
                       select o.id, l, 1 + l, 1, 9.99, 9.99 from o, generate_series(1, 4) l""",
                    (n,),
                )
            n += 1
    done.append(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=2000, help="row changes per second")
    ap.add_argument("--duration", type=float, default=30)
    args = ap.parse_args()
    from bench.capture_drain import setup

    name = f"lat_{int(time.time())}"
    setup(0, 4, 100, name)  # fresh database, slot and publication; no backlog
    env = dict(os.environ, PG_DSN=dsn_for(DB), CDC_SLOT=name, CDC_PUBLICATION=name, CDC_TOPIC_PREFIX=name, CDC_METRICS_PORT="0")
    log = (ROOT / ".local" / f"bench-{name}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cdc", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": uuid.uuid4().hex, "fetch.wait.max.ms": 5, "auto.offset.reset": "earliest"})
    topic = f"{name}.order.events"
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while topic not in consumer.list_topics(timeout=5).topics:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"capture did not create {topic}; see {log.name}")
            time.sleep(0.2)
        parts = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        stop, done = threading.Event(), []
        writer = threading.Thread(target=drive, args=(dsn_for(DB), args.rate, args.duration, stop, done))
        writer.start()
        t0 = time.time()
        while writer.is_alive() or time.time() - t0 < args.duration + 3:
            for msg in consumer.consume(1000, 0.002):
                if msg.error():
                    continue
                now_ms = time.time() * 1000
                value = orjson.loads(msg.value())
                if value.get("event_type") != "OrderPlaced":
                    continue
                commit_ms = parse_iso_ms(value["occurred_at"])
                latencies.append(now_ms - commit_ms)
            if not writer.is_alive() and len(latencies) >= done[0]:
                break
        writer.join()
    finally:
        proc.send_signal(2)
        proc.wait(30)
        consumer.close()
        cleanup(name)
    latencies.sort()
    n = len(latencies)
    result = {
        "benchmark": "capture_steady_state_latency",
        "row_changes_per_s": args.rate,
        "transactions": done[0] if done else 0,
        "events_seen": n,
        "commit_to_kafka_ms": {
            "p50": round(latencies[n // 2], 1) if n else None,
            "p99": round(latencies[int(n * 0.99)], 1) if n else None,
            "max": round(latencies[-1], 1) if n else None,
        },
        "target": {"p99_ms": "< 50"},
        "note": "commit timestamps have ms resolution; latency measured to the consumer reading the record",
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def cleanup(name: str) -> None:
    """Drop what setup() made: its slots (an inactive slot holds WAL forever), its
    database and its topics."""
    from psycopg import sql

    from bench.projection_throughput import delete_topics

    with psycopg.connect(dsn_for("postgres"), autocommit=True) as c:
        for slot in (name, f"{name}_recv"):
            c.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s", (slot,))
        c.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(DB)))
    delete_topics(name, KAFKA)


def parse_iso_ms(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


if __name__ == "__main__":
    main()
