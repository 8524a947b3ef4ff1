"""Throughput of ClickHouseSink.apply into embedded chdb.

    .venv/bin/python -m bench.clickhouse_apply [--events N] [--batch B] [--profile]

Events are made the way cdc makes them (the writer's command mix as row
changes, through cdc.mapping.TransactionMapper), generated batch by batch
outside the timed section. Prints one JSON object: events_per_s over apply()
only (wall clock), events_per_thread_cpu_s (CPU of the applying thread: the
figure to compare on a shared machine), the share of digesting events into
rows (Python) against inserting (ClickHouse), and per-batch latency.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from cdc.changes import RowChange
from cdc.events import DomainEvent, format_occurred_at
from cdc.mapping import TransactionMapper, map_transaction
from projections import clickhouse_sink
from projections.clickhouse_backend import open_backend
from projections.clickhouse_sink import ClickHouseSink
from projections.positions import Position

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
CATEGORIES = ("books", "games", "garden", "kitchen", "toys", "music", "sports", "tools")
KEYS = {"orders": ("id",), "order_items": ("order_id", "line_no"), "payments": ("id",),
        "customers": ("id",), "products": ("id",)}  # fmt: skip


def iso(ts_ms: int) -> str:
    return format_occurred_at(ts_ms)[:-1] + "000Z"


class Workload:
    """The writer's command mix; every call returns the events of one transaction."""

    def __init__(self, seed: int = 7, products: int = 2000, customers: int = 20000) -> None:
        self.rnd = random.Random(seed)
        self.mapper = TransactionMapper()
        self.lsn = 0x16_0000_0000
        self.ts = START_MS
        self.orders: dict[int, dict[str, Any]] = {}
        self.open_orders: list[int] = []
        self.paid: list[int] = []
        self.products: dict[int, dict[str, Any]] = {}
        self.customers: dict[int, dict[str, Any]] = {}
        self.next_order = 1
        self.next_payment = 1
        self.n_products = products
        self.n_customers = customers

    def _tx(self, changes: list[tuple[str, str, Any, Any, tuple[str, ...]]]) -> list[DomainEvent]:
        self.lsn += 0x800
        self.ts += self.rnd.randint(100, 4000)
        built = [
            RowChange(op, "public", table, KEYS[table], before, after, unavailable, (),
                      self.lsn - 0x400 + i, self.lsn, self.lsn & 0xFFFFFF, i, self.ts, None)
            for i, (op, table, before, after, unavailable) in enumerate(changes)
        ]  # fmt: skip
        return list(map_transaction(built, self.mapper))

    def seed(self) -> Iterator[list[DomainEvent]]:
        for pid in range(1, self.n_products + 1):
            now = iso(self.ts)
            row = {"id": pid, "sku": f"SKU-{pid:06d}", "name": f"Product {pid}",
                   "category": CATEGORIES[pid % len(CATEGORIES)],
                   "price": f"{self.rnd.randint(100, 9999) / 100:.2f}", "stock": 1_000_000,
                   "attributes": {"color": "red", "size": "M"}, "description": "d" * 3000,
                   "active": True, "created_at": now, "updated_at": now}  # fmt: skip
            self.products[pid] = row
            yield self._tx([("c", "products", None, dict(row), ())])
        for cid in range(1, self.n_customers + 1):
            now = iso(self.ts)
            row = {"id": cid, "email": f"c{cid}@example.com", "full_name": f"Customer {cid}",
                   "phone": "+49 30 1234567", "profile": {"newsletter": True, "tier": "basic"},
                   "bio": "b" * 2500, "created_at": now, "updated_at": now}  # fmt: skip
            self.customers[cid] = row
            yield self._tx([("c", "customers", None, dict(row), ())])

    def step(self) -> list[DomainEvent]:
        r = self.rnd.random()
        if r < 0.45 or not self.open_orders:
            return self.place()
        if r < 0.70:
            return self.status(self.open_orders, "paid", payment="capture")
        if r < 0.85 and self.paid:
            return self.status(self.paid, "shipped")
        if r < 0.88:
            return self.status(self.open_orders, "cancelled")
        if r < 0.90 and self.paid:
            return self.status(self.paid, "refunded", payment="refund")
        if r < 0.97:
            cid = self.rnd.randint(1, self.n_customers)
            row = self.customers[cid]
            row["full_name"] = f"Customer {cid} v{self.rnd.randint(1, 99)}"
            row["updated_at"] = iso(self.ts)
            after = {k: v for k, v in row.items() if k != "bio"}
            return self._tx([("u", "customers", None, after, ("bio",))])
        pid = self.rnd.randint(1, self.n_products)
        row = self.products[pid]
        row["price"] = f"{self.rnd.randint(100, 9999) / 100:.2f}"
        row["updated_at"] = iso(self.ts)
        after = {k: v for k, v in row.items() if k != "description"}
        return self._tx([("u", "products", None, after, ("description",))])

    def place(self) -> list[DomainEvent]:
        oid = self.next_order
        self.next_order += 1
        now = iso(self.ts)
        changes: list[tuple[str, str, Any, Any, tuple[str, ...]]] = []
        items = []
        subtotal = 0
        for line in range(1, self.rnd.randint(1, 5) + 1):
            pid = self.rnd.randint(1, self.n_products)
            qty = self.rnd.randint(1, 3)
            unit = int(float(self.products[pid]["price"]) * 100)
            subtotal += unit * qty
            items.append({"order_id": oid, "line_no": line, "product_id": pid, "quantity": qty,
                          "unit_price": f"{unit / 100:.2f}", "line_total": f"{unit * qty / 100:.2f}"})  # fmt: skip
        tax = subtotal // 5
        order = {"id": oid, "customer_id": self.rnd.randint(1, self.n_customers),
                 "status": "pending", "currency": self.rnd.choice(("EUR", "EUR", "USD")),
                 "subtotal": f"{subtotal / 100:.2f}", "tax": f"{tax / 100:.2f}",
                 "shipping_fee": "4.90", "total": f"{(subtotal + tax + 490) / 100:.2f}",
                 "shipping_address": {"street": "Main St 1", "city": "Berlin", "country": "DE"},
                 "placed_at": now, "paid_at": None, "shipped_at": None, "cancelled_at": None,
                 "refunded_at": None, "updated_at": now}  # fmt: skip
        self.orders[oid] = order
        self.open_orders.append(oid)
        changes.append(("c", "orders", None, dict(order), ()))
        changes += [("c", "order_items", None, item, ()) for item in items]
        for item in items:
            product = self.products[item["product_id"]]
            product["stock"] -= item["quantity"]
            product["updated_at"] = now
            after = {k: v for k, v in product.items() if k != "description"}
            changes.append(("u", "products", None, after, ("description",)))
        return self._tx(changes)

    def status(self, pool: list[int], status: str, payment: str | None = None) -> list[DomainEvent]:
        oid = pool.pop(self.rnd.randrange(len(pool)))
        order = self.orders[oid]
        now = iso(self.ts)
        order.update({"status": status, f"{status}_at": now, "updated_at": now})
        changes: list[tuple[str, str, Any, Any, tuple[str, ...]]] = [
            ("u", "orders", None, dict(order), ())
        ]
        if status == "paid":
            self.paid.append(oid)
        if payment is not None:
            pay = {"id": self.next_payment, "order_id": oid, "kind": payment,
                   "amount": order["total"], "method": "card",
                   "provider_ref": f"00000000-0000-4000-8000-{self.next_payment:012d}",
                   "created_at": now}  # fmt: skip
            self.next_payment += 1
            changes.append(("c", "payments", None, pay, ()))
        if status in ("shipped", "refunded", "cancelled"):
            self.orders.pop(oid)
        return self._tx(changes)


def batches(work: Workload, total: int, size: int) -> Iterator[list[DomainEvent]]:
    produced = 0
    batch: list[DomainEvent] = []
    for events in work.seed():
        batch += events
        if len(batch) >= size:
            produced += len(batch)
            yield batch
            batch = []
    while produced < total:
        batch += work.step()
        if len(batch) >= size:
            produced += len(batch)
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true", help="pyinstrument of apply() to stderr")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-chdb-") as path:
        backend = open_backend(f"chdb://{path}")
        sink = ClickHouseSink(backend, "bench")
        sink.migrate()
        work = Workload()
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler()
        apply_s = digest_s = apply_cpu_s = digest_cpu_s = 0.0
        latencies: list[float] = []
        n_events = n_changes = 0
        offset = 0
        for batch in batches(work, args.events, args.batch):
            offset += len(batch)
            positions = {("shop.order.events", p): Position(offset, work.lsn) for p in range(6)}
            # The generator's own state (every open order, product, customer) would
            # make each full GC pass slower and slower; a worker holds no such
            # heap, so keep it out of the collector's way.
            gc.freeze()
            if profiler is not None:
                profiler.start()
            c0 = time.thread_time()
            t0 = time.perf_counter()
            clickhouse_sink.digest(batch)  # timed separately: the Python share
            t1 = time.perf_counter()
            c1 = time.thread_time()
            sink.apply(batch, positions)
            t2 = time.perf_counter()
            c2 = time.thread_time()
            if profiler is not None:
                profiler.stop()
            digest_s += t1 - t0
            apply_s += t2 - t1
            digest_cpu_s += c1 - c0
            apply_cpu_s += c2 - c1
            latencies.append((t2 - t1) * 1000)
            n_events += len(batch)
            n_changes += sum(len(e.changes) for e in batch)
        t0 = time.perf_counter()
        counts = {
            v: backend.query(f"SELECT count() FROM bench.{v}").rows[0][0]
            for v in ("events_v", "orders_v", "order_items_v", "payments_v", "customers_v",
                      "products_v")
        }  # fmt: skip
        count_s = time.perf_counter() - t0
        latencies.sort()
        result = {
            "bench": "clickhouse_apply",
            "events": n_events,
            "changes": n_changes,
            "batch": args.batch,
            "batches": len(latencies),
            "events_per_s": round(n_events / apply_s),
            "changes_per_s": round(n_changes / apply_s),
            "apply_s": round(apply_s, 2),
            "digest_share": round(digest_s / apply_s, 3),
            # CPU of this thread only: what apply() costs when the machine is not shared
            "events_per_thread_cpu_s": round(n_events / apply_cpu_s),
            "digest_thread_cpu_share": round(digest_cpu_s / apply_cpu_s, 3),
            "batch_ms_p50": round(statistics.median(latencies), 1),
            "batch_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 1),
            "rows": counts,
            "count_views_s": round(count_s, 3),
            "toast_unresolved": sink.toast_unresolved,
        }
        backend.close()
    print(json.dumps(result))
    if profiler is not None:
        print(profiler.output_text(unicode=False, color=False), file=sys.stderr)


if __name__ == "__main__":
    main()
