"""Rebuild under live load: a new generation is built beside the live one and switched in;
no read fails, no watermark goes backwards, and the result equals a projection built fresh."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from cdc.lsn import parse_lsn
from tests.projections.test_snapshots import views, wait_watermark

ROOT = Path(__file__).resolve().parents[2]


def test_rebuild_under_live_load_switches_without_a_failed_read(
    event_topics: Any, shop_history: Any, worker_factory: Any, tmp_path: Path
) -> None:
    namespace = f"test:{uuid.uuid4().hex[:8]}"
    worker = worker_factory(event_topics.prefix, namespace)
    worker.start()
    first = []
    for cid in range(1, 21):
        first += shop_history.register(cid)
        first += shop_history.place(cid, cid)
    event_topics.publish(first, watermark=shop_history.lsn + 0x1000)
    wait_watermark(worker, shop_history.lsn + 0x1000)

    stop = threading.Event()
    failures: list[str] = []
    regressions: list[str] = []

    def reader() -> None:
        last: dict[str, int] = {}
        i = 0
        while not stop.is_set():
            i += 1
            code, body, _ = worker.get(f"/users/{1 + i % 20}")
            if code != 200:
                failures.append(f"/users/{1 + i % 20} -> {code} {body}")
            code, status, _ = worker.get("/status")
            if code != 200:
                failures.append(f"/status -> {code}")
                continue
            for name, p in status["projections"].items():
                mark = parse_lsn(p["watermark"])
                if mark < last.get(name, 0):
                    regressions.append(f"{name}: {last[name]:X} -> {mark:X}")
                last[name] = max(last.get(name, 0), mark)

    def writer() -> None:
        oid = 21
        while not stop.is_set():
            events = shop_history.pay(oid - 20, 1000 + oid) if oid - 20 <= 20 else []
            events += shop_history.register(oid) + shop_history.place(oid, oid)
            event_topics.publish(events, watermark=shop_history.lsn + 0x1000)
            oid += 1
            time.sleep(0.05)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        result = subprocess.run([sys.executable, "-m", "projections", "rebuild", "all", "--source", "topics"],
                                cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=300)  # fmt: skip
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "redis: switched to the new generation" in result.stdout
    assert "clickhouse: switched to the new generation" in result.stdout
    assert not failures, failures[:5]
    assert not regressions, regressions[:5]

    final = shop_history.lsn + 0x1000
    event_topics.publish([], watermark=final)
    wait_watermark(worker, final)
    client = redis.Redis.from_url("redis://127.0.0.1:56379/0")
    generation = client.get(f"{namespace}@generation")
    assert generation is not None and generation.decode().startswith(f"{namespace}.g")
    assert not list(client.scan_iter(match=f"{namespace}:*", count=1000)), "the old generation was not dropped"

    # the rebuilt projections equal projections built fresh from the same topics
    fresh = worker_factory(
        event_topics.prefix, f"test:{uuid.uuid4().hex[:8]}",
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'chdb-fresh'}", PROJECTIONS_DATA_DIR=str(tmp_path / "data-fresh"),
        PROJECTIONS_APP_ID=f"{event_topics.prefix}-fresh",
    )  # fmt: skip
    fresh.start()
    wait_watermark(fresh, final)
    n = max(shop_history.orders)
    assert views(worker, range(1, n + 1), range(1, n + 1)) == views(fresh, range(1, n + 1), range(1, n + 1))
    for key in client.scan_iter(match=f"{generation.decode()}:*", count=1000):
        client.unlink(key)
    client.delete(f"{namespace}@generation")
