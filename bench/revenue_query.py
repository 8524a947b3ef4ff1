"""Latency of the revenue queries over 1M orders (with their items) in embedded chdb.

    .venv/bin/python -m bench.revenue_query [--orders N] [--runs R]

The current-state tables are filled the way the sink leaves them: every order
first written as placed (pending), then most of them again with a higher
version as paid / shipped / cancelled / refunded, in batch-sized parts. It
times ClickHouseSink.revenue() (the query the API runs) right after the
inserts (many parts, FINAL has to merge) and after background merging has
caught up (OPTIMIZE ... FINAL, the steady state). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from typing import Any

from projections.clickhouse_backend import Backend, open_backend
from projections.clickhouse_sink import ClickHouseSink

PART = 100_000  # rows per insert, like a few batches of the sink

_ORDERS = """
INSERT INTO {db}.orders (id, customer_id, status, currency, subtotal, tax, shipping_fee, total,
    shipping_address, placed_at, paid_at, shipped_at, cancelled_at, refunded_at, updated_at,
    version, is_deleted, commit_lsn, seq)
SELECT id, customer_id, status, currency, subtotal, tax, 4.90, subtotal + tax + 4.90,
       '{{"city":"Berlin","country":"DE"}}', placed_at,
       if(status IN ('paid', 'shipped', 'refunded'), placed_at + toIntervalSecond(600), NULL),
       if(status = 'shipped', placed_at + toIntervalSecond(86400), NULL),
       if(status = 'cancelled', placed_at + toIntervalSecond(3600), NULL),
       if(status = 'refunded', placed_at + toIntervalSecond(7 * 86400), NULL),
       placed_at, bitOr(bitShiftLeft(toUInt128(lsn), 16), 1), 0, lsn, 0
FROM (
    SELECT number + 1 AS id,
           intHash32(number) % 50000 + 1 AS customer_id,
           {status} AS status,
           ['EUR', 'EUR', 'USD'][number % 3 + 1] AS currency,
           toDecimal64(intHash32(number * 7) % 30000, 2) / 100 + 5 AS subtotal,
           toDecimal64(subtotal * 0.19, 2) AS tax,
           toDateTime64('2025-01-01 00:00:00', 6, 'UTC') + toIntervalSecond(number * 60) AS placed_at,
           {lsn} AS lsn
    FROM numbers({start}, {count}) {where}
)"""

_ITEMS = """
INSERT INTO {db}.order_items (order_id, line_no, product_id, quantity, unit_price, line_total,
    version, is_deleted, commit_lsn, seq)
SELECT order_id, line_no, product_id, quantity, unit_price, unit_price * quantity,
       bitOr(bitShiftLeft(toUInt128(order_id * 4096), 16), 1), 0, order_id * 4096, line_no
FROM (
    SELECT number + 1 AS order_id, arrayJoin(range(1, intHash32(number) % 5 + 2)) AS line_no,
           intHash32(number * 31 + line_no) % 2000 + 1 AS product_id,
           intHash32(number + line_no) % 3 + 1 AS quantity,
           toDecimal64(intHash32(number * 13 + line_no) % 10000, 2) / 100 + 1 AS unit_price
    FROM numbers({start}, {count})
)"""

_PRODUCTS = """
INSERT INTO {db}.products (id, sku, name, category, price, stock, attributes, active,
    created_at, updated_at, version, is_deleted, commit_lsn, seq)
SELECT number + 1, concat('SKU-', toString(number + 1)), concat('Product ', toString(number + 1)),
       ['books', 'games', 'garden', 'kitchen', 'toys', 'music', 'sports', 'tools'][number % 8 + 1],
       10, 100, '{{}}', true, now64(6), now64(6), 1, 0, 1, 0
FROM numbers(2000)"""

_FINAL_STATUS = (
    "['paid', 'shipped', 'shipped', 'shipped', 'cancelled', 'refunded', 'paid'][number % 7 + 1]"
)


def fill(backend: Backend, db: str, n_orders: int) -> dict[str, float]:
    t0 = time.perf_counter()
    backend.command(_PRODUCTS.format(db=db))
    for start in range(0, n_orders, PART):
        count = min(PART, n_orders - start)
        first = _ORDERS.format(
            db=db, status="'pending'", lsn="(number + 1) * 4096", start=start, count=count, where=""
        )
        backend.command(first)
        backend.command(_ITEMS.format(db=db, start=start, count=count))
    # Nine in ten orders move on (later versions, later parts); one in ten stays pending.
    for start in range(0, n_orders, PART):
        count = min(PART, n_orders - start)
        later = _ORDERS.format(
            db=db,
            status=_FINAL_STATUS,
            lsn="(number + 1) * 4096 + 1099511627776",
            start=start,
            count=count,
            where="WHERE number % 10 != 0",
        )
        backend.command(later)
    return {"fill_s": round(time.perf_counter() - t0, 1)}


def timed(runs: int, call: Any) -> dict[str, float]:
    """Wall clock, and CPU of the whole process (the engine's threads included):
    on a shared machine the CPU figure is the one that does not depend on the
    neighbours; on an idle one the wall clock is at most that."""
    call()  # warm up (first read of the parts)
    ms = []
    cpu = []
    for _ in range(runs):
        c0 = time.process_time()
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    ms.sort()
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
        "cpu_p50_ms": round(statistics.median(cpu), 1),
    }


def measure(sink: ClickHouseSink, runs: int) -> dict[str, Any]:
    start, end = date(2025, 1, 1), date(2026, 12, 31)
    return {
        "revenue_by_day": timed(runs, lambda: sink.revenue(start, end, "day")),
        "revenue_by_day_one_month": timed(
            runs, lambda: sink.revenue(date(2025, 6, 1), date(2025, 6, 30), "day")
        ),
        "revenue_by_product": timed(runs, lambda: sink.revenue(start, end, "product")),
        "revenue_by_category": timed(runs, lambda: sink.revenue(start, end, "category")),
        "funnel": timed(runs, lambda: sink.funnel()),
    }


def parts(backend: Backend, db: str) -> dict[str, int]:
    rows = backend.query(
        "SELECT table, count() FROM system.parts WHERE active AND database = {db:String} "
        "AND table IN ('orders', 'order_items') GROUP BY table",
        {"db": db},
    ).rows
    return {str(t): int(n) for t, n in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-chdb-") as path:
        backend = open_backend(f"chdb://{path}")
        sink = ClickHouseSink(backend, "bench")
        sink.migrate()
        result: dict[str, Any] = {"bench": "revenue_query", "orders": args.orders}
        result.update(fill(backend, "bench", args.orders))
        counts = backend.query(
            "SELECT (SELECT count() FROM bench.orders_v), (SELECT count() FROM bench.order_items_v)"
        ).rows[0]
        result["orders_v"], result["order_items_v"] = int(counts[0]), int(counts[1])
        result["days"] = len(sink.revenue(date(2025, 1, 1), date(2026, 12, 31), "day"))
        result["parts_unmerged"] = parts(backend, "bench")
        result["unmerged"] = measure(sink, args.runs)
        t0 = time.perf_counter()
        for table in ("orders", "order_items", "products"):
            backend.command(f"OPTIMIZE TABLE bench.{table} FINAL")
        result["optimize_s"] = round(time.perf_counter() - t0, 1)
        result["parts_merged"] = parts(backend, "bench")
        result["merged"] = measure(sink, args.runs)
        result["target_revenue_by_day_ms"] = 200
        backend.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
