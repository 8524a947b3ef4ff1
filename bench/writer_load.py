"""Benchmark: the writer's command mix, as fast as the database answers.

Migrates the target database, makes sure it holds a catalogue to order from
(at least 10,000 customers and 1,000 products, seeded with COPY if missing),
then runs the load generator with ``--rate 0`` and prints one JSON object:
the load summary plus the client's CPU per command and the machine's load
average (this machine is shared; a busy neighbour shows up there first).

    python -m bench.writer_load [DURATION_S]      (or WRITER_BENCH_DURATION, default 30)

Other knobs: WRITER_BENCH_CONCURRENCY (default 8), WRITER_BENCH_SEED (1),
PG_DSN (default: the local stack's shop database).

Target on the 2-core development machine: >= 1,000 commands/s, p99 < 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import orjson

from writer.db import default_dsn, describe_target
from writer.errors import WriterError
from writer.load import LoadConfig, run_load, summary
from writer.migrate import migrate
from writer.seed import seed

TARGET_RATE = 1000.0
TARGET_P99_MS = 50.0
CUSTOMERS = 10_000
PRODUCTS = 1_000


def _catalogue(dsn: str) -> dict[str, int]:
    """Top the shop up to CUSTOMERS customers and PRODUCTS active products."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM products WHERE active)"
        ).fetchone()
    assert row is not None
    customers, products = max(0, CUSTOMERS - row[0]), max(0, PRODUCTS - row[1])
    if customers or products:
        seed(dsn, customers=customers, products=products, seed=2024)
    return {"customers_added": customers, "products_added": products}


def main(argv: list[str]) -> int:
    duration = float(argv[1] if len(argv) > 1 else os.environ.get("WRITER_BENCH_DURATION", 30))
    config = LoadConfig(
        rate=0,
        duration=duration,
        concurrency=int(os.environ.get("WRITER_BENCH_CONCURRENCY", 8)),
        seed=int(os.environ.get("WRITER_BENCH_SEED", 1)),
    )
    dsn = default_dsn()
    try:
        migrate(dsn)
        prepared = _catalogue(dsn)
        load_before = os.getloadavg()
        cpu_before = time.process_time()
        stats, elapsed = asyncio.run(run_load(dsn, config))
        cpu = time.process_time() - cpu_before
    except WriterError as exc:
        print(f"bench.writer_load: error: {exc}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "benchmark": "writer_load",
        "database": describe_target(dsn),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        **prepared,
        **summary(stats, elapsed, config),
        "client_cpu_ms_per_command": round(1000 * cpu / max(stats.attempted, 1), 3),
    }
    result["target"] = {"rate": TARGET_RATE, "p99_ms": TARGET_P99_MS}
    result["meets_target"] = (
        result["rate"] >= TARGET_RATE and result["latency_ms"]["p99"] < TARGET_P99_MS
    )
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
