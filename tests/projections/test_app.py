"""The worker process: crash safety (kill -9 mid-batch), redelivery, resuming from the sinks' positions."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdc.lsn import format_lsn

from .conftest import EventTopics, ShopHistory, WorkerProcess


def _history(shop: ShopHistory, customers: int, orders: int) -> list:
    events: list = []
    for cid in range(1, customers + 1):
        events += shop.register(cid)
    for oid in range(1, orders + 1):
        events += shop.place(oid, 1 + oid % customers, lines=1 + oid % 3)
        if oid % 2 == 0:
            events += shop.pay(oid, payment_id=oid)
        if oid % 4 == 0:
            events += shop.ship(oid)
    return events


def _wait_caught_up(worker: WorkerProcess, lsn: int, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        code, status, _ = worker.get("/status")
        if code == 200 and all(
            p["watermark"] == format_lsn(lsn) for p in status["projections"].values()
        ):
            return status
        time.sleep(0.2)
    raise AssertionError(f"not caught up to {format_lsn(lsn)} within {timeout} s: {status}")


def _caught_up_worker(  # type: ignore[no-untyped-def]
    event_topics: EventTopics, worker_factory, shop: ShopHistory, namespace: str, customers: int, orders: int
) -> tuple[WorkerProcess, list, int]:
    """A worker started on a published shop history and caught up with it: (worker, events, lsn)."""
    events = _history(shop, customers=customers, orders=orders)
    lsn = shop.lsn + 0x10000
    event_topics.publish(events, watermark=lsn)
    worker = worker_factory(event_topics.prefix, namespace)
    worker.start()
    _wait_caught_up(worker, lsn)
    return worker, events, lsn


def _expected_statuses(shop: ShopHistory) -> dict[str, int]:
    counts: dict[str, int] = {}
    for order in shop.orders.values():
        counts[order["status"]] = counts.get(order["status"], 0) + 1
    return counts


def _views(worker: WorkerProcess, shop: ShopHistory) -> dict:
    """Everything the projections show: every user and order view, ClickHouse state and aggregates."""
    out: dict = {}
    for cid in shop.customers:
        code, body, _ = worker.get(f"/users/{cid}")
        assert code == 200, body
        body.pop("watermark")
        out[f"user:{cid}"] = body
    for oid in shop.orders:
        code, body, _ = worker.get(f"/orders/{oid}")
        assert code == 200, body
        body.pop("watermark")
        out[f"order:{oid}"] = body
    for name, sql in {
        "statuses": "SELECT status, count() FROM orders_v GROUP BY status ORDER BY status",
        "items": "SELECT count(), sum(line_total) FROM order_items_v",
        "ltv": "SELECT * FROM customer_ltv_v ORDER BY ALL",
        "daily": "SELECT * FROM orders_by_status_daily_v ORDER BY ALL",
        "events": "SELECT count() FROM events_v",
    }.items():
        code, body = worker.post("/analytics/sql", {"sql": sql})
        assert code == 200, body
        out[name] = body["rows"]
    return out


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_crash_or_stop_mid_batch_then_restart_applies_every_event(
    event_topics: EventTopics,
    worker_factory,
    shop_history: ShopHistory,
    redis_namespace: str,
    how: str,
) -> None:  # type: ignore[no-untyped-def]
    events = _history(shop_history, customers=50, orders=3000)
    final = shop_history.lsn + 0x10000
    event_topics.publish(events, watermark=final)
    worker = worker_factory(
        event_topics.prefix,
        redis_namespace,
        # small batches, so that both projections are part-way for long enough to be
        # seen there (with 300 and 1000, a fast run applied all 5 300 events first)
        PROJECTIONS_BATCH_MAX="20",
        PROJECTIONS_CH_BATCH_MAX="100",
        PROJECTIONS_CH_BATCH_WAIT_MS="50",
    )
    worker.start()
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline:
        _, status, _ = worker.get("/status")
        applied = {n: p["events_applied"] for n, p in status["projections"].items()}
        if all(0 < n < len(events) for n in applied.values()):
            partial = applied
            break
        time.sleep(0.02)
    assert partial is not None, f"never saw both projections part-way: {status}"
    if how == "kill -9":
        worker.kill9()
    else:
        worker.stop()  # graceful: a batch in flight must not be committed unapplied

    worker.start()
    status = _wait_caught_up(worker, final)
    # the restarted worker resumed where the sinks' positions said, not from scratch
    restarted = {n: p["events_applied"] for n, p in status["projections"].items()}
    assert all(restarted[n] < len(events) for n in restarted), (partial, restarted)

    views = _views(worker, shop_history)
    for oid, order in shop_history.orders.items():
        assert views[f"order:{oid}"]["status"] == order["status"]
        assert len(views[f"order:{oid}"]["items"]) == 1 + oid % 3
    expected = _expected_statuses(shop_history)
    assert dict(views["statuses"]) == expected
    assert sum(v["orders"] for k, v in views.items() if k.startswith("user:")) == 3000
    assert views["events"] == [[len(events)]]


def test_the_same_events_delivered_twice_leave_every_view_unchanged(
    event_topics: EventTopics, worker_factory, shop_history: ShopHistory, redis_namespace: str
) -> None:  # type: ignore[no-untyped-def]
    worker, events, first = _caught_up_worker(
        event_topics, worker_factory, shop_history, redis_namespace, customers=20, orders=300
    )
    before = _views(worker, shop_history)

    event_topics.publish(events, watermark=first + 0x10000)  # every event again, at new offsets
    status = _wait_caught_up(worker, first + 0x10000)
    assert all(p["events_applied"] >= 2 * len(events) for p in status["projections"].values())
    assert _views(worker, shop_history) == before


def test_a_restart_resumes_from_the_stored_positions_even_if_kafka_committed_less(
    event_topics: EventTopics, worker_factory, shop_history: ShopHistory, redis_namespace: str
) -> None:  # type: ignore[no-untyped-def]
    """The store is the truth: a new consumer group (nothing committed) does not re-read everything."""
    worker, _, lsn = _caught_up_worker(
        event_topics, worker_factory, shop_history, redis_namespace, customers=5, orders=100
    )
    worker.stop()

    worker.env["PROJECTIONS_APP_ID"] = f"{event_topics.prefix}-other-group"
    worker.start()
    status = _wait_caught_up(worker, lsn)
    assert status["projections"]["redis"]["events_applied"] == 0
    assert status["projections"]["clickhouse"]["events_applied"] == 0


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_redis_process_is_restarted_when_it_dies_and_never_outlives_the_worker(
    event_topics: EventTopics, worker_factory, shop_history: ShopHistory, redis_namespace: str
) -> None:  # type: ignore[no-untyped-def]
    """The Redis pipeline runs in a child process of the worker (projections/redis_process.py)."""
    worker, first, lsn = _caught_up_worker(
        event_topics, worker_factory, shop_history, redis_namespace, customers=10, orders=200
    )
    # what the worker shows comes from the child's reports, the offset lag included
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker.get("/status")[1]["projections"]["redis"]["offset_lag"] != 0:
        time.sleep(0.1)
    redis_status = worker.get("/status")[1]["projections"]["redis"]
    assert redis_status["offset_lag"] == 0 and redis_status["events_applied"] == len(first), redis_status
    # its metrics too (reported every second), in the same families as the worker's
    want = f'projection_events_total{{projection="redis"}} {float(len(first))}'
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and want not in (metrics := worker.get_text("/metrics")):
        time.sleep(0.2)
    assert want in metrics and 'projection_events_total{projection="clickhouse"}' in metrics, metrics
    types = [line for line in metrics.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family appears twice"
    [child] = worker.children()
    # both run uvloop, the default PROJECTIONS_EVENT_LOOP
    assert worker.proc is not None
    for pid in (worker.proc.pid, child):
        assert "uvloop" in Path(f"/proc/{pid}/maps").read_text(), f"pid {pid} does not run uvloop"

    # the child dies: the worker says so, starts another, and the views go on
    import os
    import signal

    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and worker.children() in ([], [child]):
        time.sleep(0.1)
    [second] = worker.children()
    assert second != child
    more = []
    for oid in range(1, 201, 2):
        more += shop_history.pay(oid, payment_id=10_000 + oid)
    event_topics.publish(more, watermark=lsn + 0x10000)
    _wait_caught_up(worker, lsn + 0x10000)
    assert worker.get("/health")[0] == 200
    views = _views(worker, shop_history)
    assert all(views[f"order:{oid}"]["status"] == shop_history.orders[oid]["status"] for oid in shop_history.orders)
    assert dict(views["statuses"]) == _expected_statuses(shop_history)
    log = worker.log.read_text()
    assert "the pipeline process exited with -9" in log, log[-3000:]

    # the worker is killed: its Redis process ends on its own (its stdin closes)
    worker.kill9(worker_only=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _pid_alive(second):
        time.sleep(0.1)
    assert not _pid_alive(second), "the Redis process outlived the worker"


def test_the_projections_split_over_two_workers_each_serve_their_own(  # type: ignore[no-untyped-def]
    event_topics: EventTopics, worker_factory, shop_history: ShopHistory, redis_namespace: str
) -> None:
    """PROJECTIONS: one worker runs the Redis views, another ClickHouse, on one chdb
    directory (the Redis worker never opens it). Each serves its projection's reads,
    answers the other's with 503 and what to do, and refuses a snapshot of both."""
    events = _history(shop_history, customers=3, orders=8)
    lsn = shop_history.lsn + 0x10000
    event_topics.publish(events, watermark=lsn)
    views = worker_factory(event_topics.prefix, redis_namespace, PROJECTIONS="redis")
    # asyncio's own event loop, the other choice of PROJECTIONS_EVENT_LOOP
    analytics = worker_factory(
        event_topics.prefix, redis_namespace, PROJECTIONS="clickhouse", PROJECTIONS_EVENT_LOOP="asyncio"
    )
    views.start()
    analytics.start()
    assert set(_wait_caught_up(views, lsn)["projections"]) == {"redis"}
    assert set(_wait_caught_up(analytics, lsn)["projections"]) == {"clickhouse"}
    assert len(views.children()) == 1 and analytics.children() == []  # the Redis process
    assert analytics.proc is not None and "uvloop" not in Path(f"/proc/{analytics.proc.pid}/maps").read_text()

    code, user, _ = views.get(f"/users/1?min_lsn={format_lsn(lsn)}")
    assert code == 200 and user["orders"] == sum(1 for o in shop_history.orders.values() if o["customer_id"] == 1)
    code, body = analytics.post("/analytics/sql", {"sql": "SELECT count() FROM orders_v"})
    assert code == 200 and body["rows"] == [[8]]

    code, body, _ = analytics.get("/users/1")
    assert code == 503
    assert "does not run the redis projection (PROJECTIONS=clickhouse)" in body["error"]
    code, body = views.post("/analytics/sql", {"sql": "SELECT 1"})
    assert code == 503 and "does not run the clickhouse projection" in body["error"]
    code, body = views.post("/admin/rebuild", {"projections": ["clickhouse"]})
    assert code == 400 and "does not run the clickhouse projection" in body["error"]
    code, body = analytics.post("/admin/snapshots", {})
    assert code == 400 and "a snapshot holds both projections" in body["error"]

    # "all" is what the worker runs: the Redis worker rebuilds its views from the topics
    cli = [sys.executable, "-m", "projections"]
    done = subprocess.run([*cli, "rebuild", "all"], env=views.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert views.get("/admin/rebuild")[1]["projections"] == ["redis"]
    assert views.get("/users/1")[1]["orders"] == user["orders"]
    # the verifier reads embedded ClickHouse through the worker that runs it: pointed at the
    # Redis worker, it says so, and stops (test_e2e checks a split deployment end to end)
    checked = subprocess.run([*cli, "verify", "--timeout", "5"], env=views.env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert "does not run clickhouse (it runs redis: PROJECTIONS)" in checked.stderr
