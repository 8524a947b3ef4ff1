"""Benchmark: apply realistic domain events to the Redis user views in batches.

    .venv/bin/python bench/redis_apply.py [--events 200000] [--batch 2000] [--profile]

Events are made by cdc's TransactionMapper from row changes shaped like the
writer's commands (register, place with 1-4 items, pay, ship, cancel, refund,
profile changes with an unchanged TOASTed bio), then applied with
RedisViews.apply, one round trip per batch (one EVALSHA per 1,000 ops), to the local Redis (REDIS_URL) under
a namespace of its own that is deleted afterwards. Prints JSON: events/s of
the whole apply (Python digest + Redis), batch latency percentiles, and the
share of time spent digesting in Python. --profile prints a pyinstrument
profile of the digest step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
import uuid
from typing import Any

import orjson
import redis.asyncio as redis

from cdc.changes import RowChange
from cdc.events import DomainEvent
from cdc.mapping import TransactionMapper
from projections.positions import Position
from projections.redis_views import RedisViews, digest

KEYS = {
    "customers": ("id",),
    "orders": ("id",),
    "order_items": ("order_id", "line_no"),
    "payments": ("id",),
}


def _iso(ms: int) -> str:
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms % 1000:03d}Z"


class Workload:
    """The writer's command mix, as the events cdc would publish for it."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.mapper = TransactionMapper()
        self.lsn = 0x16_0000_0000
        self.ms = 1_764_000_000_000
        self.customers: dict[int, dict[str, Any]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.next_order = 1
        self.next_payment = 1
        self.bio = "x" * 4000

    def _tx(
        self, changes: list[tuple[str, str, dict[str, Any], tuple[str, ...]]]
    ) -> list[DomainEvent]:
        self.lsn += 0x200
        self.ms += 3
        self.mapper.begin(self.lsn, self.ms, 1)
        out: list[DomainEvent] = []
        for seq, (op, table, row, unavailable) in enumerate(changes):
            before, after = (row, None) if op == "d" else (None, row)
            out += self.mapper.add(
                RowChange(op, "public", table, KEYS[table], before, after, unavailable, (),
                          self.lsn - 0x100 + seq, self.lsn, 1, seq, self.ms, None)
            )  # fmt: skip
        return out + self.mapper.end()

    def register(self) -> list[DomainEvent]:
        cid = len(self.customers) + 1
        now = _iso(self.ms)
        row = {
            "id": cid, "email": f"c{cid}@example.com", "full_name": f"Customer {cid}",
            "phone": "+49 30 1234567", "profile": {"newsletter": True, "lang": "de"},
            "bio": self.bio, "created_at": now, "updated_at": now,
        }  # fmt: skip
        self.customers[cid] = row
        return self._tx([("c", "customers", dict(row), ())])

    def change_profile(self) -> list[DomainEvent]:
        row = self.customers[self.rng.randint(1, len(self.customers))]
        row["full_name"] = f"Renamed {self.ms}"
        row["updated_at"] = _iso(self.ms)
        after = {k: v for k, v in row.items() if k != "bio"}
        return self._tx([("u", "customers", after, ("bio",))])

    def place(self) -> list[DomainEvent]:
        oid = self.next_order
        self.next_order += 1
        now = _iso(self.ms)
        items: list[dict[str, Any]] = []
        subtotal = 0
        for line in range(1, self.rng.randint(1, 4) + 1):
            qty, price = self.rng.randint(1, 3), self.rng.randint(100, 20_000)
            subtotal += qty * price
            items.append({
                "order_id": oid, "line_no": line, "product_id": self.rng.randint(1, 5000),
                "quantity": qty, "unit_price": f"{price // 100}.{price % 100:02d}",
                "line_total": f"{qty * price // 100}.{qty * price % 100:02d}",
            })  # fmt: skip
        tax = subtotal * 19 // 100
        total = subtotal + tax + 495

        def m(c: int) -> str:
            return f"{c // 100}.{c % 100:02d}"

        row: dict[str, Any] = {
            "id": oid, "customer_id": self.rng.randint(1, len(self.customers)), "status": "pending",
            "currency": self.rng.choice(("EUR", "EUR", "EUR", "USD", "GBP")),
            "subtotal": m(subtotal), "tax": m(tax), "shipping_fee": "4.95", "total": m(total),
            "shipping_address": {"name": "A B", "line1": "Street 1", "city": "Berlin",
                                 "postal_code": "10115", "country": "DE"},
            "placed_at": now, "paid_at": None, "shipped_at": None, "cancelled_at": None,
            "refunded_at": None, "updated_at": now,
        }  # fmt: skip
        self.orders[oid] = row
        return self._tx(
            [("c", "orders", dict(row), ())] + [("c", "order_items", i, ()) for i in items]
        )

    def move(self) -> list[DomainEvent]:
        oid = self.rng.randint(max(1, self.next_order - 2000), self.next_order - 1)
        row = self.orders[oid]
        status = row["status"]
        now = _iso(self.ms)
        payment = None
        if status == "pending":
            new, payment = ("paid", "capture") if self.rng.random() < 0.9 else ("cancelled", None)
        elif status == "paid":
            new, payment = ("shipped", None) if self.rng.random() < 0.9 else ("refunded", "refund")
        elif status == "shipped" and self.rng.random() < 0.05:
            new, payment = "refunded", "refund"
        else:
            return self.change_profile()
        row.update({"status": new, f"{new}_at": now, "updated_at": now})
        changes: list[Any] = [("u", "orders", dict(row), ())]
        if payment:
            changes.append(("c", "payments", {
                "id": self.next_payment, "order_id": oid, "kind": payment, "amount": row["total"],
                "method": "card", "provider_ref": str(uuid.UUID(int=self.next_payment)),
                "created_at": now,
            }, ()))  # fmt: skip
            self.next_payment += 1
        return self._tx(changes)

    def events(self, n: int) -> list[DomainEvent]:
        out: list[DomainEvent] = []
        for _ in range(200):
            out += self.register()
        while len(out) < n:
            r = self.rng.random()
            if r < 0.04:
                out += self.register()
            elif r < 0.40:
                out += self.place()
            else:
                out += self.move()
        return out[:n]


def _wire(events: list[DomainEvent]) -> list[DomainEvent]:
    """Round-trip through JSON, as the worker sees them after decode_record."""
    from cdc.events import decode_record, encode_event

    out = []
    for event in events:
        decoded = decode_record(encode_event(event)[1])
        assert isinstance(decoded, DomainEvent)
        out.append(decoded)
    return out


def _cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(n: int, batch: int, profile: bool) -> dict[str, Any]:
    events = _wire(Workload().events(n))
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:56379/0")
    client = redis.Redis.from_url(url)
    namespace = f"bench-redis-apply:{uuid.uuid4().hex[:8]}"
    views = RedisViews(client, namespace)
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    latencies = []
    digest_s = 0.0
    try:
        await views.apply([], {})  # loads the script
        redis_cpu0 = _cpu(await client.info("cpu"))
        python_cpu0 = time.process_time()
        start = time.perf_counter()
        for k, chunk in enumerate(batches):
            t0 = time.perf_counter()
            await views.apply(chunk, {("shop.order.events", k % 6): Position(k * batch, k)})
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        python_cpu = time.process_time() - python_cpu0
        redis_cpu = _cpu(await client.info("cpu")) - redis_cpu0
        load = os.getloadavg()[0]
        for chunk in batches:  # the Python share, measured alone
            t0 = time.perf_counter()
            digest(chunk, [])
            digest_s += time.perf_counter() - t0
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
            for chunk in batches:
                digest(chunk, [])
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
        info = await client.memory_usage(f"{namespace}:user:1") or 0
        keys = 0
        async for _ in client.scan_iter(match=f"{namespace}:*", count=5000):
            keys += 1
    finally:
        cursor = 0
        while True:
            cursor, found = await client.scan(cursor, match=f"{namespace}:*", count=5000)
            if found:
                await client.delete(*found)
            if cursor == 0:
                break
        await client.aclose()
    latencies.sort()
    return {
        "events": len(events),
        "batch": batch,
        "batches": len(batches),
        "ops_applied": views.ops_applied,
        "events_per_s": round(len(events) / elapsed),
        "ms_per_batch_p50": round(latencies[len(latencies) // 2] * 1000, 2),
        "ms_per_batch_p99": round(
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2
        ),
        "digest_share": round(digest_s / elapsed, 3),
        # CPU actually spent, robust to a machine shared with other work (see load_avg):
        # Redis's includes whatever other clients made it do meanwhile.
        "redis_cpu_us_per_event": round(redis_cpu / len(events) * 1e6, 1),
        "python_cpu_us_per_event": round(python_cpu / len(events) * 1e6, 1),
        "events_per_redis_cpu_s": round(len(events) / redis_cpu),
        "load_avg": round(load, 2),
        "digest_events_per_s": round(len(events) / digest_s),
        "keys": keys,
        "user_key_bytes": info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument(
        "--profile", action="store_true", help="pyinstrument profile of the digest step"
    )
    args = parser.parse_args()
    print(orjson.dumps(asyncio.run(run(args.events, args.batch, args.profile))).decode())


if __name__ == "__main__":
    main()
