"""End to end with the real stack: writer -> Postgres -> cdc -> Kafka -> worker -> Redis/ClickHouse -> verifier.

One database, slot, publication, topic prefix, Redis namespace and chdb
directory of this module's own; everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis

from cdc.lsn import parse_lsn
from projections.verify import verify

from .conftest import KAFKA_BOOTSTRAP, REDIS_URL, ShopHistory, WorkerProcess
from .stack import Stack

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        s.open()
        yield s
    finally:
        s.close()


def test_a_seeded_random_workload_leaves_no_difference(stack: Stack) -> None:
    stack.writer("load", "--commands", "3000", "--concurrency", "4", "--seed", "11", "--rate", "0")
    stack.verify()


def test_a_commands_token_as_min_lsn_returns_a_view_containing_the_write(stack: Stack) -> None:
    from writer import commands
    from writer.db import open_pool

    async def run() -> tuple[str, int, str]:
        pool = await open_pool(stack.dsn, 2)
        try:
            customer = await commands.register_customer(
                pool, email=f"ryw-{stack.tag}@example.com", full_name="Read Your Writes"
            )
            async with pool.connection() as conn:
                row = await (
                    await conn.execute("SELECT id FROM products WHERE active ORDER BY id LIMIT 1")
                ).fetchone()
            assert row is not None
            order = await commands.place_order(
                pool, customer.id, [(row[0], 1)],
                shipping_address={"name": "R", "line1": "1 Main Street", "city": "Paris",
                                  "postal_code": "75001", "country": "FR"},
            )  # fmt: skip
            return order.lsn, order.id, customer.lsn
        finally:
            await pool.close()

    token, order_id, _ = asyncio.run(run())
    code, body, headers = stack.worker.get(f"/orders/{order_id}?min_lsn={token}&timeout_ms=10000")
    assert code == 200, body
    assert body["status"] == "pending" and parse_lsn(headers["X-Watermark-LSN"]) >= parse_lsn(token)
    code, body, _ = stack.worker.get(f"/analytics/funnel?min_lsn={token}&timeout_ms=10000")
    assert code == 200
    code, body = stack.worker.post(
        f"/analytics/sql?min_lsn={token}&timeout_ms=10000",
        {"sql": f"SELECT status FROM orders_v WHERE id = {order_id}"},
    )
    assert code == 200 and body["rows"] == [["pending"]]


def test_kill_9_of_the_worker_during_load_then_restart_leaves_no_difference(stack: Stack) -> None:
    load = subprocess.Popen(
        [sys.executable, "-m", "writer", "load", "--commands", "4000", "--concurrency", "4",
         "--seed", "12", "--rate", "0", "--dsn", stack.dsn],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(3.0)
    stack.worker.kill9()
    assert load.wait(300) == 0
    stack.worker.start()
    stack.verify()


def test_poison_events_go_to_the_dead_letter_topic_while_the_rest_flows(stack: Stack) -> None:
    from aiokafka import AIOKafkaConsumer
    from confluent_kafka import Producer

    from cdc.events import encode_event

    order_topic = f"{stack.prefix}.order.events"
    producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP})
    producer.produce(order_topic, b"\x00garbage", b"1")
    shop = ShopHistory()
    (placed,) = shop.place(10**12, 1)
    producer.produce(
        order_topic,
        encode_event(replace(placed, event_version=42))[1],
        placed.aggregate_id.encode(),
    )
    producer.flush(10)
    stack.writer("load", "--commands", "500", "--concurrency", "2", "--seed", "13", "--rate", "0")
    stack.verify()

    async def letters() -> list:
        consumer = AIOKafkaConsumer(
            f"{order_topic}.dlq",
            bootstrap_servers=KAFKA_BOOTSTRAP,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        got: list = []
        try:
            deadline = time.monotonic() + 20
            while len(got) < 4 and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    got += batch
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(letters())
    stages = sorted((dict(m.headers)["dlq.projection"], dict(m.headers)["dlq.stage"]) for m in got)
    assert stages == [
        (b"clickhouse", b"decode"),
        (b"clickhouse", b"upcast"),
        (b"redis", b"decode"),
        (b"redis", b"upcast"),
    ]
    _, status, _ = stack.worker.get("/status")
    assert all(p["dead_letters"] == 2 for p in status["projections"].values())


def _verify_cli(stack: Stack, api_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m projections verify`` on the stack, QUERY_API naming the worker at api_port."""
    return subprocess.run(
        [sys.executable, "-m", "projections", "verify", "--timeout", "30", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PG_DSN": stack.dsn, "REDIS_NAMESPACE": stack.namespace,
             "QUERY_API": f"127.0.0.1:{api_port}", "TOPIC_PREFIX": stack.prefix,
             "CLICKHOUSE_URL": stack.worker.env["CLICKHOUSE_URL"]},
    )  # fmt: skip


def test_the_verifier_checks_projections_split_over_two_workers(stack: Stack) -> None:
    """PROJECTIONS=redis and =clickhouse in workers of their own: the verifier takes the Redis
    watermark from the positions stored in Redis, and embedded ClickHouse's (and its rows)
    through the worker that runs it; pointed at the other worker, it says which it needs."""
    stack.worker.stop()
    views, analytics = (
        WorkerProcess(stack.tmp, stack.prefix, stack.namespace, {"PG_DSN": stack.dsn, "PROJECTIONS": name})
        for name in ("redis", "clickhouse")
    )  # fmt: skip
    try:
        views.start()
        analytics.start()
        stack.writer("load", "--commands", "500", "--concurrency", "2", "--seed", "14", "--rate", "0")
        out = _verify_cli(stack, analytics.port)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "all match" in out.stdout and "ok  redis orders" in out.stdout
        out = _verify_cli(stack, views.port)
        assert out.returncode == 2, out.stdout[-3000:]
        assert f"the worker at http://127.0.0.1:{views.port} does not run clickhouse" in out.stderr
        assert "point QUERY_API at that worker" in out.stderr
    finally:
        views.stop()
        analytics.stop()
        stack.worker.start()


def test_the_verifier_says_why_it_cannot_compare(stack: Stack) -> None:
    """Kafka unreachable, the topics missing, a Redis namespace holding nothing: each is
    named, with the setting to check (the CLI prints it and exits 2)."""
    settings = stack.settings()
    cases = [
        (replace(settings, kafka_bootstrap="127.0.0.1:9"),
         "cannot read the event topics' partitions from Kafka at 127.0.0.1:9 (KAFKA_BOOTSTRAP)"),
        (replace(settings, topic_prefix=f"{stack.prefix}x"),
         f"{stack.prefix}x.order.events does not exist"),
        (replace(settings, redis_namespace=f"{stack.namespace}x"),
         f"Redis holds no positions under REDIS_NAMESPACE='{stack.namespace}x'"),
    ]  # fmt: skip
    for broken, message in cases:
        with pytest.raises((RuntimeError, TimeoutError)) as caught:
            asyncio.run(verify(broken, timeout_s=1.0))
        assert message in str(caught.value)


def test_the_verifier_reports_a_tampered_view_and_exits_1(stack: Stack) -> None:
    """Last in the module: it damages the Redis views on purpose."""
    with psycopg.connect(stack.dsn) as conn:
        row = conn.execute(
            "SELECT id FROM orders WHERE status = 'paid' ORDER BY id LIMIT 1"
        ).fetchone()
    assert row is not None
    client = redis.Redis.from_url(REDIS_URL)
    code, view, _ = stack.worker.get(f"/orders/{row[0]}")
    assert code == 200 and view["status"] == "paid"
    # damage the view in Redis directly (whatever its key layout): status paid -> shipped
    key = f"{stack.namespace}:order:{row[0]}"
    for field, value in client.hgetall(key).items():
        if b'"paid"' in value:
            client.hset(
                key,
                field,
                value.replace(b'"status":"paid"', b'"status":"shipped"').replace(
                    b'"paid"', b'"shipped"'
                ),
            )
    assert stack.worker.get(f"/orders/{row[0]}")[1]["status"] == "shipped"
    out = _verify_cli(stack, stack.worker.port, "--json")
    assert out.returncode == 1, out.stdout[:3000]
    import orjson

    report = orjson.loads(out.stdout)
    orders = report["checks"]["redis orders"]
    assert orders["differences"] == 1
    assert f"order {row[0]}: status: postgres='paid' projection='shipped'" in orders["first"][0]
    assert report["checks"]["clickhouse orders_v"]["differences"] == 0
