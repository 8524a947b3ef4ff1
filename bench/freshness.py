"""Benchmark: how soon a committed write is visible, through the whole pipeline, under load.

    .venv/bin/python bench/freshness.py [--changes-per-s 2000] [--seconds 30]

Real parts only: a database of its own with the writer's schema, ``python -m
cdc run`` (own slot, publication and topic prefix), ``python -m projections
worker`` (own Redis namespace and chdb directory), and ``python -m writer
load`` as background traffic at a rate that makes about --changes-per-s row
changes per second (measured from pg_stat_user_tables and reported). Every
100 ms a probe command (a profile change) commits and takes its consistency
token; right after the commit the probe asks the worker for the customer
(Redis) and for a ClickHouse row with ``min_lsn=<token>``. The time from the
commit returning to each answer is the freshness. Prints JSON percentiles.
Targets: Redis p99 < 250 ms, ClickHouse p99 < 2 s. ``--only redis`` (or
``clickhouse``) runs the worker with that projection alone (``PROJECTIONS``)
and probes only it: as with the other in a worker on a host of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from projection_throughput import (  # noqa: E402
    Worker,
    cpu_pressure_pct,
    cpu_stall_us,
    delete_topics,
    machine_cpu_s,
)

from cdc.lsn import parse_lsn  # noqa: E402

ADMIN_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")


def _changes(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables"
        ).fetchone()
    return int(row[0]) if row else 0


class WatermarkWatch:
    """When cdc's Watermark records pass an LSN on every partition: the pipeline's share of the time ends there."""

    def __init__(self, prefix: str) -> None:
        self.topics = [f"{prefix}.{a}.events" for a in ("order", "customer", "product")]
        self.marks: dict[tuple[str, int], int] = {}
        self.changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self.consumer = AIOKafkaConsumer(*self.topics, bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092"),
                                         group_id=None, auto_offset_reset="latest",
                                         # as the worker's pipelines fetch (projections/app.py): with
                                         # the defaults (1 byte, 500 ms) this watch alone made the
                                         # broker answer hundreds of fetches a second, CPU taken from
                                         # the pipeline it measures
                                         fetch_min_bytes=32 * 1024, fetch_max_wait_ms=25)  # fmt: skip
        await self.consumer.start()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            got = await self.consumer.getmany(timeout_ms=100)
            for tp, msgs in got.items():
                for m in msgs:
                    if m.value and m.value.startswith(b'{"event_type":"Watermark"'):
                        self.marks[(tp.topic, tp.partition)] = parse_lsn(orjson.loads(m.value)["lsn"])
            if got:
                self.changed.set()
                self.changed = asyncio.Event()

    def minimum(self) -> int:
        return min(self.marks.values()) if len(self.marks) == 18 else 0

    async def wait(self, lsn: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.minimum() < lsn:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return True

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.consumer.stop()


async def probe(
    dsn: str, url: str, seconds: float, interval: float, prefix: str, names: tuple[str, ...]
) -> dict[str, list[float]]:
    import aiohttp

    from writer import commands
    from writer.db import open_pool

    pool = await open_pool(dsn, 2)
    out: dict[str, list[float]] = {"redis": [], "clickhouse": [], "kafka": [], "timeouts": []}
    watch = WatermarkWatch(prefix)
    await watch.start()
    try:
        customer = await commands.register_customer(pool, email=f"probe-{uuid.uuid4().hex[:8]}@example.com", full_name="Probe")
        async with aiohttp.ClientSession() as session:

            async def redis_read(token: str, t0: float) -> None:
                async with session.get(f"{url}/users/{customer.id}?min_lsn={token}&timeout_ms=10000") as resp:
                    await resp.read()
                    (out["redis"] if resp.status == 200 else out["timeouts"]).append(time.perf_counter() - t0)

            async def clickhouse_read(token: str, t0: float) -> None:
                body = {"sql": f"SELECT full_name FROM customers_v WHERE id = {customer.id}"}
                async with session.post(f"{url}/analytics/sql?min_lsn={token}&timeout_ms=10000", json=body) as resp:
                    await resp.read()
                    (out["clickhouse"] if resp.status == 200 else out["timeouts"]).append(time.perf_counter() - t0)

            async def kafka_seen(token: str, t0: float) -> None:
                if await watch.wait(parse_lsn(token), 10.0):
                    out["kafka"].append(time.perf_counter() - t0)

            tasks = []
            end = time.monotonic() + seconds
            n = 0
            while time.monotonic() < end:
                n += 1
                result = await commands.change_profile(pool, customer.id, full_name=f"Probe {n}")
                t0 = time.perf_counter()
                tasks.append(asyncio.create_task(kafka_seen(result.lsn, t0)))
                if "redis" in names:
                    tasks.append(asyncio.create_task(redis_read(result.lsn, t0)))
                if "clickhouse" in names:
                    tasks.append(asyncio.create_task(clickhouse_read(result.lsn, t0)))
                await asyncio.sleep(interval)
            await asyncio.gather(*tasks)
    finally:
        await pool.close()
        await watch.stop()
    return out


def _batch_means(text: str) -> dict[str, dict[str, float]]:
    """Mean apply time and batch size per projection, from the worker's Prometheus text."""
    raw: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("projection_apply_seconds_sum", "projection_apply_seconds_count", "projection_batch_size_sum"):
            if line.startswith(name + "{"):
                projection = line.split('projection="')[1].split('"')[0]
                raw[f"{name}:{projection}"] = float(line.rsplit(" ", 1)[1])
    out = {}
    for p in ("redis", "clickhouse"):
        n = raw.get(f"projection_apply_seconds_count:{p}", 0.0) or 1.0
        out[p] = {
            "batches": n,
            "apply_ms_mean": round(1000 * raw.get(f"projection_apply_seconds_sum:{p}", 0.0) / n, 1),
            "records_per_batch_mean": round(raw.get(f"projection_batch_size_sum:{p}", 0.0) / n, 1),
        }
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    values = sorted(values)

    def pct(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 1)

    return {"n": len(values), "ms_p50": pct(0.5), "ms_p90": pct(0.9), "ms_p99": pct(0.99), "ms_max": round(values[-1] * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes-per-s", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--changes-per-command", type=float, default=2.5, help="to turn the target into a writer rate (measured: 2.5-2.6 row changes per command of the mix)")
    parser.add_argument("--only", choices=("redis", "clickhouse"),
                        help="the worker runs this projection alone (PROJECTIONS): as with the other in a worker on a host of its own")  # fmt: skip
    args = parser.parse_args()
    names = (args.only,) if args.only else ("redis", "clickhouse")

    tag = uuid.uuid4().hex[:8]
    db = f"bench_fresh_{tag}"
    dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=db)
    prefix = f"benchfresh{tag}"
    cdc_env = {**os.environ, "PG_DSN": dsn, "CDC_SLOT": f"bench_{tag}", "CDC_PUBLICATION": f"bench_{tag}",
               "CDC_TOPIC_PREFIX": prefix, "CDC_METRICS_PORT": "0"}  # fmt: skip
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    worker = Worker(prefix, {"PG_DSN": dsn, "PROJECTIONS": ",".join(names)})
    cdc: subprocess.Popen[bytes] | None = None
    load: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([sys.executable, "-m", "writer", "migrate", "--dsn", dsn], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "writer", "seed", "--customers", "2000", "--products", "500", "--dsn", dsn],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        cdc_env["CDC_SPOOL_DIR"] = str(worker.tmp / "spool")
        cdc = subprocess.Popen([sys.executable, "-m", "cdc", "run", "--log-level", "warning"], cwd=ROOT, env=cdc_env,
                               stdout=subprocess.DEVNULL, stderr=(worker.tmp / "cdc.log").open("ab"))  # fmt: skip
        worker.start()
        rate = args.changes_per_s / args.changes_per_command
        load = subprocess.Popen(
            [sys.executable, "-m", "writer", "load", "--rate", f"{rate:.0f}", "--duration", str(args.seconds + 10),
             "--concurrency", "8", "--dsn", dsn],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(5)  # let the load and the pipeline settle
        before, t_before = _changes(dsn), time.monotonic()
        stall0 = cpu_stall_us()
        busy0, all0 = machine_cpu_s()
        result = asyncio.run(probe(dsn, worker.url, args.seconds, 0.1, prefix, names))
        pressure = cpu_pressure_pct(stall0, time.monotonic() - t_before)
        busy, all_ = machine_cpu_s()
        changes_per_s = (_changes(dsn) - before) / (time.monotonic() - t_before)
        status = worker.status()
        import urllib.request

        with urllib.request.urlopen(f"{worker.url}/metrics", timeout=30) as resp:
            metrics = _batch_means(resp.read().decode())
    finally:
        for proc in (load, cdc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        worker.stop()
        subprocess.run([sys.executable, "-m", "cdc", "reset", "--yes"], cwd=ROOT, env=cdc_env, capture_output=True)
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        delete_topics(prefix)
        shutil.rmtree(worker.tmp, ignore_errors=True)
    out = {
        "benchmark": "freshness",
        "changes_per_s_target": args.changes_per_s,
        "changes_per_s_measured": round(changes_per_s),
        "projections": list(names),
        **{f"commit_to_{name}": _stats(result[name]) for name in names},
        # cdc's share: the commit until its Watermark is on every partition of the topics
        "commit_to_kafka_watermark": _stats(result["kafka"]),
        "timeouts": len(result["timeouts"]),
        # time some task waited for a CPU while the probes ran (Linux PSI): the p99s of the
        # same code differ 2-4x between runs on a 2-core machine, and rise with it
        "cpu_pressure_pct": pressure,
        # every process's CPU while the probes ran, against what the cores had (/proc/stat)
        "machine_cpu_busy_pct": round(100 * (busy - busy0) / max(all_ - all0, 1e-9), 1),
        "targets_ms_p99": {name: {"redis": 250, "clickhouse": 2000}[name] for name in names},
        "batches": {name: metrics[name] for name in names},
        "lag_at_end": {n: {"lag_bytes": p["lag_bytes"], "lag_seconds": p["lag_seconds"]} for n, p in status["projections"].items()},
    }
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
