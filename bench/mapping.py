"""Throughput of the domain mapping (row changes -> events) and of event encoding.

    .venv/bin/python -m bench.mapping [--changes N] [--profile]

Prints one JSON object. Workloads: the writer's command mix (place order with
items and stock updates, pay, ship, profile change, price change), and one
bulk transaction touching many products (the eviction path).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cdc.changes import RowChange
from cdc.events import encode_event
from cdc.mapping import TransactionMapper

TS = 1_764_139_447_123
BIO = "x" * 3000


def _tx(commit_lsn: int, rows: Sequence[tuple[str, str, tuple[str, ...], Any, Any]]) -> list[RowChange]:
    return [
        RowChange(op, "public", table, key, before, after, (), (),
                  commit_lsn - len(rows) + i, commit_lsn, commit_lsn & 0xFFFFF, i, TS, None)
        for i, (op, table, key, before, after) in enumerate(rows)
    ]  # fmt: skip


def command_mix(n_changes: int, seed: int = 7) -> list[list[RowChange]]:
    """Transactions shaped like the writer's commands, about n_changes changes in total."""
    rnd = random.Random(seed)
    txs: list[list[RowChange]] = []
    lsn = 0x16_0000_0000
    order_id = 0
    total = 0
    pk = ("id",)
    while total < n_changes:
        lsn += 0x400
        kind = rnd.random()
        ts = "2026-11-26T06:44:07.123456Z"
        rows: list[tuple[str, str, tuple[str, ...], Any, Any]]
        if kind < 0.45 or order_id == 0:
            order_id += 1
            n_items = rnd.randint(1, 5)
            rows = [("c", "orders", pk, None, {
                "id": order_id, "customer_id": rnd.randint(1, 5000), "status": "pending",
                "currency": "EUR", "subtotal": "90.00", "tax": "9.00", "shipping_fee": "4.90",
                "total": "103.90", "shipping_address": {"city": "Berlin", "zip": "10115"},
                "placed_at": ts, "paid_at": None, "shipped_at": None, "cancelled_at": None,
                "refunded_at": None, "updated_at": ts})]  # fmt: skip
            for line in range(1, n_items + 1):
                rows.append(("c", "order_items", ("order_id", "line_no"), None, {
                    "order_id": order_id, "line_no": line, "product_id": rnd.randint(1, 2000),
                    "quantity": 2, "unit_price": "15.00", "line_total": "30.00"}))  # fmt: skip
            for _ in range(n_items):
                rows.append(("u", "products", pk, None, {
                    "id": rnd.randint(1, 2000), "sku": "SKU-1", "name": "Thing", "category": "c",
                    "price": "15.00", "stock": rnd.randint(0, 500), "attributes": {"c": 1},
                    "active": True, "created_at": ts, "updated_at": ts}))  # fmt: skip
        elif kind < 0.75:
            oid = rnd.randint(1, order_id)
            rows = [
                ("u", "orders", pk, None, {"id": oid, "status": "paid", "paid_at": ts,
                                           "updated_at": ts, "total": "103.90"}),
                ("c", "payments", pk, None, {"id": lsn, "order_id": oid, "kind": "capture",
                                             "amount": "103.90", "method": "card",
                                             "provider_ref": "3f0c", "created_at": ts}),
            ]  # fmt: skip
        elif kind < 0.85:
            rows = [("u", "orders", pk, None, {"id": rnd.randint(1, order_id),
                                               "status": "shipped", "shipped_at": ts,
                                               "updated_at": ts})]  # fmt: skip
        elif kind < 0.95:
            rows = [("u", "customers", pk, None, {"id": rnd.randint(1, 5000), "email": "a@b.c",
                                                  "full_name": "A B", "phone": None,
                                                  "profile": {"tier": "gold"},
                                                  "created_at": ts, "updated_at": ts})]  # fmt: skip
        else:
            rows = [("u", "products", pk, {"id": 1, "price": "14.00"}, {
                "id": rnd.randint(1, 2000), "price": "15.00", "updated_at": ts})]
        tx = _tx(lsn, rows)
        txs.append(tx)
        total += len(tx)
    return txs


def bulk(n_changes: int) -> list[list[RowChange]]:
    """One transaction updating n_changes distinct products (exercises eviction)."""
    ts = "2026-11-26T06:44:07.123456Z"
    rows = [
        ("u", "products", ("id",), None, {"id": i, "price": "1.00", "stock": i, "updated_at": ts})
        for i in range(n_changes)
    ]
    return [_tx(0x17_0000_0000, rows)]


def run(
    txs: list[list[RowChange]], sink: Callable[[Any], object]
) -> tuple[float, float, int, int]:
    mapper = TransactionMapper()
    events = 0
    changes = 0
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.process_time()
    for tx in txs:
        first = tx[0]
        mapper.begin(first.commit_lsn, first.commit_ts_ms, first.txid)
        for change in tx:
            for event in mapper.add(change):
                sink(event)
                events += 1
        for event in mapper.end():
            sink(event)
            events += 1
        changes += len(tx)
    return time.perf_counter() - t0, time.process_time() - c0, changes, events


def _best(txs: list[list[RowChange]], sink: Callable[[Any], object], rounds: int) -> dict[str, Any]:
    # best of `rounds`, by CPU time: the machine is shared, wall time is reported beside it
    best = min((run(txs, sink) for _ in range(rounds)), key=lambda r: r[1])
    seconds, cpu, changes, events = best
    return {
        "changes": changes,
        "events": events,
        "wall_s": round(seconds, 4),
        "cpu_s": round(cpu, 4),
        "changes_per_cpu_s": round(changes / cpu),
        "events_per_cpu_s": round(events / cpu),
        "changes_per_wall_s": round(changes / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="pyinstrument the command mix")
    args = parser.parse_args(argv)

    mix = command_mix(args.changes)
    big = bulk(args.changes)
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
        run(mix, encode_event)
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False), file=sys.stderr)

    def discard(event: Any) -> None:
        return None

    result = {
        "bench": "mapping",
        "python": sys.version.split()[0],
        "command_mix_map": _best(mix, discard, args.rounds),
        "command_mix_map_encode": _best(mix, encode_event, args.rounds),
        "bulk_tx_map_encode": _best(big, encode_event, args.rounds),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
