"""Rebuilds: a new generation is built beside the live one and switched in.

- Under live writer load, through the real pipeline (writer -> Postgres ->
  ``python -m cdc run`` -> Kafka -> worker), first from the topics, then from a
  fresh snapshot of Postgres, bulk loaded (on top of the first rebuild's
  generation): no read fails and no watermark or order count goes backwards
  during the switch, the old generation is dropped, and once the load stops
  and the pipeline caught up the verifier (projections/verify.py, against
  Postgres) finds no difference.
- Records the rebuild cannot read (undecodable, unknown version) are counted
  in its state, its progress output and its final report.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis

from cdc.lsn import parse_lsn
from tests.projections.conftest import REDIS_URL
from tests.projections.stack import Stack, delete_keys
from tests.projections.test_snapshots import wait_watermark

ROOT = Path(__file__).resolve().parents[2]
# generous on a loaded 2-core machine: the worker, cdc, the writer, Postgres, Kafka and
# the test's reader share it
CATCH_UP_S = 180.0


def rebuild(worker: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "projections", "rebuild", *args], cwd=ROOT, env=worker.env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def generation(client: redis.Redis, namespace: str) -> str:
    value = client.get(f"{namespace}@generation")
    return value.decode() if isinstance(value, bytes) else namespace


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A database, slot, publication, topic prefix, Redis namespace and chdb directory of
    this module's own, a seeded shop, cdc and a worker on it; all removed afterwards."""
    s = Stack(tmp_path_factory.mktemp("rebuild"))
    try:
        s.open("--customers", "300", "--products", "60", "--orders", "1500", "--seed", "5")
        yield s
    finally:
        s.close()


class Reader(threading.Thread):
    """Reads views and the status page in a loop; any failed read, and any watermark or
    order count that goes backwards, is recorded."""

    def __init__(self, worker: Any, customers: list[int], orders: list[int]) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.customers, self.orders = customers, orders
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.regressions: list[str] = []
        self.reads = 0

    def run(self) -> None:
        marks: dict[str, int] = {}
        count = 0
        i = 0
        while not self.stop.is_set():
            i += 1
            for path in (f"/users/{self.customers[i % len(self.customers)]}",
                         f"/orders/{self.orders[i % len(self.orders)]}"):  # fmt: skip
                code, body, _ = self.worker.get(path)
                self.reads += 1
                if code != 200:
                    self.failures.append(f"{path} -> {code} {body}")
            code, body = self.worker.post("/analytics/sql", {"sql": "SELECT count() FROM orders_v"})
            self.reads += 1
            if code != 200:
                self.failures.append(f"/analytics/sql -> {code} {body}")
            else:
                n = int(body["rows"][0][0])
                if n < count:
                    self.regressions.append(f"orders_v count {count} -> {n}")
                count = max(count, n)
            code, status, _ = self.worker.get("/status")
            self.reads += 1
            if code != 200:
                self.failures.append(f"/status -> {code} {status}")
                continue
            for name, p in status["projections"].items():
                mark = parse_lsn(p["watermark"])
                if mark < marks.get(name, 0):
                    self.regressions.append(f"{name} watermark {marks[name]:X} -> {mark:X}")
                marks[name] = max(marks.get(name, 0), mark)


def caught_up(stack: Stack) -> None:
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    wait_watermark(stack.worker, parse_lsn(row[0]), CATCH_UP_S)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("source", ["topics", "snapshot"])
def test_a_rebuild_under_live_load_ends_with_the_verifier_finding_no_difference(
    stack: Stack, source: str
) -> None:
    with psycopg.connect(stack.dsn) as conn:
        customers = [r[0] for r in conn.execute("SELECT id FROM customers ORDER BY id LIMIT 40")]
        orders = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id DESC LIMIT 40")]
    caught_up(stack)  # every id read below is in the views before the rebuild starts
    client = redis.Redis.from_url(REDIS_URL)
    before = generation(client, stack.namespace)

    # an open schedule of 25 commands/s (about 80 row changes/s), until stopped
    load = subprocess.Popen(
        [sys.executable, "-m", "writer", "load", "--rate", "25", "--duration", "0", "--concurrency", "2",
         "--seed", {"topics": "21", "snapshot": "22"}[source], "--json", "--dsn", stack.dsn],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    reader = Reader(stack.worker, customers, orders)
    reader.start()
    try:
        time.sleep(2.0)  # the load flows through the live pipeline before the rebuild starts
        result = rebuild(stack.worker, "all", "--source", source)
        time.sleep(1.0)  # reads after the switch too
    finally:
        reader.stop.set()
        reader.join(60)
        load.send_signal(signal.SIGINT)  # finishes the commands in flight, prints the summary
        out, err = load.communicate(timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "redis: switched to the new generation" in result.stdout
    assert "clickhouse: switched to the new generation" in result.stdout
    assert "0 skipped" in result.stdout, result.stdout
    assert reader.reads > 20, f"only {reader.reads} reads during the rebuild"
    assert not reader.failures, reader.failures[:5]
    assert not reader.regressions, reader.regressions[:5]
    summary = orjson.loads(out)
    assert summary["ok"] > 20 and not summary["failures"], (summary, err[-2000:])

    _, state, _ = stack.worker.get("/admin/rebuild")
    assert state["status"] == "done" and state["skipped"] == 0 and state["source"] == source, state
    # a total to show progress against: the topics' records, or the rows the capture re-reads
    assert state["total"] > 1000, state
    after = generation(client, stack.namespace)
    assert after != before and after.startswith(f"{stack.namespace}.g"), (before, after)
    # the old Redis generation is deleted in the background once the new one serves
    deadline = time.monotonic() + 60
    while list(client.scan_iter(match=f"{before}:*", count=1000)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(client.scan_iter(match=f"{before}:*", count=1000)), (
        "the old generation was not dropped"
    )

    # the load has stopped: once the projections reach Postgres' LSN, they must equal it
    stack.verify(timeout_s=CATCH_UP_S)


def test_records_the_rebuild_cannot_read_are_counted(
    event_topics: Any, shop_history: Any, worker_factory: Any
) -> None:
    from dataclasses import replace

    from cdc.events import encode_event

    namespace = f"test:{uuid.uuid4().hex[:8]}"
    worker = worker_factory(event_topics.prefix, namespace)
    worker.start()
    events = []
    for cid in range(1, 6):
        events += shop_history.register(cid) + shop_history.place(cid, cid)
    (placed,) = shop_history.place(99, 1)
    event_topics.publish(events, flush=False)
    order_topic = f"{event_topics.prefix}.order.events"
    event_topics.produce_raw(order_topic, b"1", b"\x00not json")
    event_topics.produce_raw(order_topic, b"99", encode_event(replace(placed, event_version=42))[1])
    event_topics.publish([], watermark=shop_history.lsn + 0x1000)
    wait_watermark(worker, shop_history.lsn + 0x1000)

    result = rebuild(worker, "all", "--source", "topics")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 skipped: decode 1, upcast 1)" in result.stdout, result.stdout
        assert (
            "2 records could not be read and were skipped (decode: 1, upcast: 1)" in result.stdout
        )
        _, state, _ = worker.get("/admin/rebuild")
        assert state["skipped"] == 2 and state["skipped_by_stage"] == {"decode": 1, "upcast": 1}, (
            state
        )
        # the readable records made it into the new generation
        assert generation(client, namespace) != namespace
        assert all(worker.get(f"/users/{cid}")[0] == 200 for cid in range(1, 6))
        assert worker.get("/orders/5")[1]["status"] == "pending"
    finally:
        delete_keys(client, f"{namespace}[:.@]*")


def test_an_event_the_stores_refuse_is_skipped_and_a_failed_rebuild_leaves_no_generation(
    event_topics: Any, shop_history: Any, worker_factory: Any
) -> None:
    """An event the live pipeline dead-letters (a payment of a fraction of a cent) is
    skipped by a rebuild too, which goes on; a rebuild that fails (here: Postgres cannot
    be reached for the snapshot) deletes the generations it had begun."""
    namespace = f"test:{uuid.uuid4().hex[:8]}"
    worker = worker_factory(event_topics.prefix, namespace,
                            PG_DSN="postgresql://postgres@127.0.0.1:55432/no_such_db_for_rebuild")  # fmt: skip
    worker.start()
    events = []
    for cid in range(1, 6):
        events += shop_history.register(cid) + shop_history.place(cid, cid)
    events += shop_history.pay(5, 77, amount="1.005")  # not a whole number of cents
    events += shop_history.ship(4)
    event_topics.publish(events, watermark=shop_history.lsn + 0x1000)
    wait_watermark(worker, shop_history.lsn + 0x1000)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        result = rebuild(worker, "all", "--source", "topics")
        assert result.returncode == 0, result.stdout + result.stderr
        _, state, _ = worker.get("/admin/rebuild")
        assert state["skipped_by_stage"].get("apply", 0) >= 1, state
        live = generation(client, namespace)
        assert live != namespace
        assert worker.get("/orders/4")[1]["status"] == "shipped"  # the events after it
        assert worker.get("/users/3")[0] == 200

        result = rebuild(worker, "all", "--source", "snapshot")
        assert result.returncode != 0, result.stdout
        _, state, _ = worker.get("/admin/rebuild")
        assert state["status"] == "failed" and "no_such_db_for_rebuild" in state["error"], state
        assert any(
            s.startswith("redis: the unfinished generation was deleted") for s in state["steps"]
        )
        assert any(
            s.startswith("clickhouse: the unfinished generation was deleted")
            for s in state["steps"]
        )
        assert generation(client, namespace) == live  # the live generation stays and serves
        assert worker.get("/users/3")[0] == 200
        others = [k for k in client.scan_iter(match=f"{namespace}.g*", count=1000)
                  if not k.decode().startswith(f"{live}:")]  # fmt: skip
        assert others == [], others[:5]
        code, body = worker.post(
            "/analytics/sql",
            {"sql": "SELECT count() FROM system.databases WHERE name LIKE '%_rebuild'"},
        )
        assert code == 200 and body["rows"] == [[0]], body
    finally:
        delete_keys(client, f"{namespace}[:.@]*")
