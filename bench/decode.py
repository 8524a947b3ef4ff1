"""Benchmark: pgoutput bytes of the orders / order_items shape -> RowChanges.

Builds N row-change messages as the server sends them (text format, the
writer's schema), wrapped in transactions, then times feeding them through
TransactionAssembler (decode + value conversion + RowChange). Prints JSON:

    python -m bench.decode [--changes 200000] [--profile]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import orjson

from cdc.pgoutput import (
    Begin,
    Column,
    Commit,
    Insert,
    Relation,
    Type,
    Update,
    decode_message,
    encode_message,
)
from cdc.transactions import TransactionAssembler

ORDERS = 16401
ITEMS = 16402
ORDER_STATUS = 16390

NUMERIC_12_2 = (12 << 16 | 2) + 4
ORDER_COLUMNS = (
    ("id", 20, True), ("customer_id", 20, False), ("status", ORDER_STATUS, False),
    ("currency", 1042, False), ("subtotal", 1700, False), ("tax", 1700, False),
    ("shipping_fee", 1700, False), ("total", 1700, False), ("shipping_address", 3802, False),
    ("placed_at", 1184, False), ("paid_at", 1184, False), ("shipped_at", 1184, False),
    ("cancelled_at", 1184, False), ("refunded_at", 1184, False), ("updated_at", 1184, False),
)  # fmt: skip
ITEM_COLUMNS = (
    ("order_id", 20, True), ("line_no", 23, True), ("product_id", 20, False),
    ("quantity", 23, False), ("unit_price", 1700, False), ("line_total", 1700, False),
)  # fmt: skip


def _relation(rel_id: int, name: str, cols: tuple[tuple[str, int, bool], ...]) -> Relation:
    return Relation(
        None, rel_id, "public", name, "d",
        tuple(Column(1 if key else 0, n, oid, NUMERIC_12_2 if oid == 1700 else -1) for n, oid, key in cols),
    )  # fmt: skip


def build(changes: int) -> list[tuple[int, bytes]]:
    """(lsn, payload) pairs: per order a tx with the order + 3 items, then a tx paying it."""
    lsn = 0x16_0000_0000
    ts = 848_990_977_000_000
    out: list[tuple[int, bytes]] = []

    def emit(payload: bytes) -> None:
        nonlocal lsn
        out.append((lsn, payload))
        lsn += 64 + len(payload)

    xid = 1000
    emit(encode_message(Begin(lsn + 10_000, ts, xid)))
    emit(encode_message(Type(None, ORDER_STATUS, "public", "order_status")))
    emit(encode_message(_relation(ORDERS, "orders", ORDER_COLUMNS)))
    emit(encode_message(_relation(ITEMS, "order_items", ITEM_COLUMNS)))
    emit(encode_message(Commit(0, lsn, lsn + 48, ts)))
    address = b'{"city": "Springfield", "line1": "742 Evergreen Terrace", "country": "US", "postcode": "49007"}'
    n = 0
    order_id = 1
    while n < changes:
        xid += 1
        placed = f"2026-11-26 06:{order_id % 60:02d}:{order_id % 60:02d}.{order_id % 1000000:06d}+00".encode()
        emit(encode_message(Begin(lsn + 2000, ts, xid)))
        row = (
            str(order_id).encode(), str(order_id % 5000 + 1).encode(), b"pending", b"USD",
            b"129.97", b"10.40", b"4.99", b"145.36", address,
            placed, None, None, None, None, placed,
        )  # fmt: skip
        emit(encode_message(Insert(None, ORDERS, row)))
        for line in range(1, 4):
            item = (
                str(order_id).encode(),
                str(line).encode(),
                str(order_id % 800 + line).encode(),
                b"2",
                b"21.66",
                b"43.32",
            )
            emit(encode_message(Insert(None, ITEMS, item)))
        emit(encode_message(Commit(0, lsn, lsn + 48, ts)))
        xid += 1
        emit(encode_message(Begin(lsn + 200, ts, xid)))
        paid = (*row[:2], b"paid", *row[3:10], placed, None, None, None, placed)
        emit(encode_message(Update(None, ORDERS, None, None, paid)))
        emit(encode_message(Commit(0, lsn, lsn + 48, ts)))
        n += 5
        order_id += 1
    return out


def run(messages: list[tuple[int, bytes]], spool: str) -> tuple[int, float, float]:
    """Feed everything; returns (items, wall seconds, CPU seconds)."""
    asm = TransactionAssembler(spool)
    changes = 0
    feed = asm.feed
    c0 = time.process_time()
    t0 = time.perf_counter()
    for lsn, payload in messages:
        for _item in feed(lsn, payload):
            changes += 1
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    asm.close()
    return changes, elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    ap.add_argument("--profile", action="store_true", help="print a pyinstrument profile to stderr")
    args = ap.parse_args(argv)
    messages = build(args.changes)

    decode_only = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for _, payload in messages:
            decode_message(payload)
        decode_only = min(decode_only, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as spool:
        run(messages[: len(messages) // 10], spool)  # warm-up
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler()
            profiler.start()
        elapsed = cpu = float("inf")
        for _ in range(args.repeat):
            items, seconds, cpu_seconds = run(messages, spool)
            elapsed = min(elapsed, seconds)
            cpu = min(cpu, cpu_seconds)
        if args.profile:
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)

    row_changes = sum(1 for _, p in messages if p[:1] in (b"I", b"U", b"D"))
    result: dict[str, Any] = {
        "messages": len(messages),
        "changes": row_changes,
        "items": items,
        "seconds": round(elapsed, 3),  # best of --repeat runs (the machine is shared)
        "messages_per_s": round(len(messages) / elapsed),
        "changes_per_s": round(row_changes / elapsed),
        "us_per_change": round(elapsed / row_changes * 1e6, 2),
        # CPU time: what the decoder costs even when the shared machine is busy
        "cpu_us_per_change": round(cpu / row_changes * 1e6, 2),
        "changes_per_cpu_s": round(row_changes / cpu),
        "decode_only_messages_per_s": round(len(messages) / decode_only),
    }
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
