"""Projection snapshots: saved with their positions, restored, and consumed onward."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from cdc.lsn import parse_lsn

ROOT = Path(__file__).resolve().parents[2]


def cli(worker: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "projections", "snapshot", *args], cwd=ROOT, env=worker.env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def wait_watermark(worker: Any, lsn: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        _, status, _ = worker.get("/status")
        marks = {name: parse_lsn(p["watermark"]) for name, p in status["projections"].items()}
        if all(m >= lsn for m in marks.values()):
            return
        assert time.monotonic() < deadline, f"watermarks {marks} did not reach {lsn:X}"
        time.sleep(0.2)


def views(worker: Any, customers: range, orders: range) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cid in customers:
        code, body, _ = worker.get(f"/users/{cid}")
        body.pop("watermark", None)
        out[f"user {cid}"] = (code, body)
    for oid in orders:
        code, body, _ = worker.get(f"/orders/{oid}")
        body.pop("watermark", None)
        out[f"order {oid}"] = (code, body)
    code, body = worker.post("/analytics/sql", {"sql": "SELECT status, count() FROM orders_v GROUP BY status ORDER BY status"})
    out["orders by status"] = (code, body.get("rows"))
    return out


def test_restore_from_a_snapshot_plus_catch_up_equals_live(event_topics: Any, shop_history: Any, worker_factory: Any) -> None:
    worker = worker_factory(event_topics.prefix, f"test:{uuid.uuid4().hex[:8]}")
    worker.start()
    first = []
    for cid in range(1, 6):
        first += shop_history.register(cid)
        first += shop_history.place(cid, cid)
    event_topics.publish(first, watermark=shop_history.lsn + 0x1000)
    at_snapshot = shop_history.lsn + 0x1000
    wait_watermark(worker, at_snapshot)

    created = cli(worker, "create")
    assert created.returncode == 0, created.stderr
    meta = orjson.loads(created.stdout)
    assert parse_lsn(meta["redis"]["watermark"]) >= at_snapshot
    assert parse_lsn(meta["clickhouse"]["watermark"]) >= at_snapshot
    assert meta["id"] in cli(worker, "list").stdout

    later = []
    for oid in range(1, 4):
        later += shop_history.pay(oid, 100 + oid)
    later += shop_history.ship(1)
    for oid in range(6, 9):
        later += shop_history.register(oid)
        later += shop_history.place(oid, oid)
    event_topics.publish(later, watermark=shop_history.lsn + 0x1000)
    live_mark = shop_history.lsn + 0x1000
    wait_watermark(worker, live_mark)
    live = views(worker, range(1, 9), range(1, 9))
    assert live["order 1"][1]["status"] == "shipped"

    restored = cli(worker, "restore", meta["id"])
    assert restored.returncode == 0, restored.stderr
    result = orjson.loads(restored.stdout)
    assert result["redis_watermark"] == meta["redis"]["watermark"]
    # the stores were put back as they were at the snapshot (5 orders), before catching up
    assert result["clickhouse_rows"]["orders"] == meta["clickhouse"]["rows"]["orders"] == 5
    assert result["redis_keys"] == meta["redis"]["keys"]
    # the worker consumes onward from the snapshot's positions and catches up
    wait_watermark(worker, live_mark)
    assert views(worker, range(1, 9), range(1, 9)) == live


def test_restoring_an_unknown_snapshot_is_a_clear_error(event_topics: Any, worker_factory: Any) -> None:
    worker = worker_factory(event_topics.prefix, f"test:{uuid.uuid4().hex[:8]}")
    worker.start()
    result = cli(worker, "restore", "20991231T000000-abcdef")
    assert result.returncode == 1
    assert "no snapshot 20991231T000000-abcdef" in result.stderr and "Traceback" not in result.stderr
