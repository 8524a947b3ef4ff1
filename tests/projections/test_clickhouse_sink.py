"""The ClickHouse projection on embedded chdb: current state, idempotency, aggregates.

Events are built the way cdc builds them: the row changes a writer command
makes, through cdc.mapping.TransactionMapper.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from cdc.changes import RowChange
from cdc.events import DomainEvent
from cdc.mapping import TransactionMapper, map_transaction
from projections.analytics import AnalyticsError
from projections.clickhouse_backend import Backend
from projections.clickhouse_sink import ClickHouseSink
from projections.positions import Position

KEYS = {
    "orders": ("id",),
    "order_items": ("order_id", "line_no"),
    "payments": ("id",),
    "customers": ("id",),
    "products": ("id",),
}
D = Decimal


def iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


class Shop:
    """Writes like the writer's commands would, as domain events (one transaction per call)."""

    def __init__(self) -> None:
        self.lsn = 0x16_0000_0000
        self.mapper = TransactionMapper()
        self.rows: dict[tuple[str, Any], dict[str, Any]] = {}
        self.next_payment = 1

    def _tx(self, at: str, changes: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, tuple[str, ...]]]) -> list[DomainEvent]:  # fmt: skip
        self.lsn += 0x1000
        ts = ms(at)
        built = [
            RowChange(op, "public", table, KEYS.get(table, ()), before, after, unavailable, (),
                      self.lsn - 0x800 + i, self.lsn, 900, i, ts, None)
            for i, (op, table, before, after, unavailable) in enumerate(changes)
        ]  # fmt: skip
        return list(map_transaction(built, self.mapper))

    def _update(self, table: str, key: Any, at: str, unavailable: tuple[str, ...] = (), **new: Any):  # type: ignore[no-untyped-def]
        row = self.rows[(table, key)]
        row.update(new)
        after = {k: v for k, v in row.items() if k not in unavailable}
        return ("u", table, None, after, unavailable)

    def add_product(self, pid: int, category: str, price: str, at: str = "2026-03-01T08:00:00") -> list[DomainEvent]:  # fmt: skip
        row = {"id": pid, "sku": f"SKU-{pid:04d}", "name": f"Product {pid}", "category": category,
               "price": price, "stock": 100, "attributes": {"color": "red"},
               "description": "x" * 3000, "active": True, "created_at": iso(ms(at)),
               "updated_at": iso(ms(at))}  # fmt: skip
        self.rows[("products", pid)] = row
        return self._tx(at, [("c", "products", None, dict(row), ())])

    def change_price(self, pid: int, price: str, at: str) -> list[DomainEvent]:
        return self._tx(at, [self._update("products", pid, at, ("description",), price=price,
                                          updated_at=iso(ms(at)))])  # fmt: skip

    def register(self, cid: int, at: str = "2026-03-01T08:00:00", profile: dict[str, Any] | None = None) -> list[DomainEvent]:  # fmt: skip
        row = {"id": cid, "email": f"c{cid}@example.com", "full_name": f"Customer {cid}",
               "phone": None, "profile": profile or {}, "bio": "b" * 5000,
               "created_at": iso(ms(at)), "updated_at": iso(ms(at))}  # fmt: skip
        self.rows[("customers", cid)] = row
        return self._tx(at, [("c", "customers", None, dict(row), ())])

    def change_name(self, cid: int, name: str, at: str, unavailable: tuple[str, ...] = ("bio",)) -> list[DomainEvent]:  # fmt: skip
        return self._tx(at, [self._update("customers", cid, at, unavailable, full_name=name,
                                          updated_at=iso(ms(at)))])  # fmt: skip

    def place(self, oid: int, cid: int, lines: list[tuple[int, int, str]], at: str, currency: str = "EUR") -> list[DomainEvent]:  # fmt: skip
        items = []
        subtotal = D("0.00")
        for n, (pid, qty, unit) in enumerate(lines, 1):
            total = D(unit) * qty
            subtotal += total
            items.append({"order_id": oid, "line_no": n, "product_id": pid, "quantity": qty,
                          "unit_price": unit, "line_total": str(total)})  # fmt: skip
        tax = (subtotal * D("0.20")).quantize(D("0.01"))
        order = {"id": oid, "customer_id": cid, "status": "pending", "currency": currency,
                 "subtotal": str(subtotal), "tax": str(tax), "shipping_fee": "4.90",
                 "total": str(subtotal + tax + D("4.90")), "shipping_address": {"country": "DE"},
                 "placed_at": iso(ms(at)), "paid_at": None, "shipped_at": None,
                 "cancelled_at": None, "refunded_at": None, "updated_at": iso(ms(at))}  # fmt: skip
        self.rows[("orders", oid)] = order
        for item in items:
            self.rows[("order_items", (oid, item["line_no"]))] = item
        return self._tx(at, [("c", "orders", None, dict(order), ())]
                        + [("c", "order_items", None, dict(i), ()) for i in items])  # fmt: skip

    def _payment(self, oid: int, kind: str, at: str) -> tuple[str, str, None, dict[str, Any], tuple[str, ...]]:  # fmt: skip
        pid = self.next_payment
        self.next_payment += 1
        row = {"id": pid, "order_id": oid, "kind": kind, "amount": self.rows[("orders", oid)]["total"],
               "method": "card", "provider_ref": f"00000000-0000-0000-0000-{pid:012d}",
               "created_at": iso(ms(at))}  # fmt: skip
        return ("c", "payments", None, row, ())

    def _status(self, oid: int, status: str, at: str) -> tuple[str, str, None, dict[str, Any], tuple[str, ...]]:  # fmt: skip
        stamp = iso(ms(at))
        return self._update(
            "orders", oid, at, status=status, updated_at=stamp, **{f"{status}_at": stamp}
        )  # type: ignore[no-any-return]

    def pay(self, oid: int, at: str) -> list[DomainEvent]:
        return self._tx(at, [self._status(oid, "paid", at), self._payment(oid, "capture", at)])

    def ship(self, oid: int, at: str) -> list[DomainEvent]:
        return self._tx(at, [self._status(oid, "shipped", at)])

    def refund(self, oid: int, at: str) -> list[DomainEvent]:
        return self._tx(at, [self._status(oid, "refunded", at), self._payment(oid, "refund", at)])

    def cancel(self, oid: int, at: str, refund: bool = False) -> list[DomainEvent]:
        changes = [self._status(oid, "cancelled", at)]
        if refund:
            changes.append(self._payment(oid, "refund", at))
        return self._tx(at, changes)

    def delete_order(self, oid: int, at: str) -> list[DomainEvent]:
        lines = sorted(k[1] for (t, k) in self.rows if t == "order_items" and k[0] == oid)
        return self._tx(at, [("d", "order_items", {"order_id": oid, "line_no": n}, None, ()) for n in lines]
                        + [("d", "orders", {"id": oid}, None, ())])  # fmt: skip

    def truncate(self, table: str, at: str) -> list[DomainEvent]:
        return self._tx(at, [("t", table, None, None, ())])


@pytest.fixture
def sink(chdb_backend: Backend, clickhouse_database: str) -> ClickHouseSink:
    s = ClickHouseSink(chdb_backend, clickhouse_database)
    s.migrate()
    return s


def q(sink: ClickHouseSink, sql: str) -> list[tuple[Any, ...]]:
    return sink.backend.query(sql.replace("{db}", sink.database)).rows


def lifecycle(shop: Shop) -> list[DomainEvent]:
    """Two products, three customers, orders in every status, two currencies, two days."""
    ev: list[DomainEvent] = []
    ev += shop.add_product(1, "books", "10.00")
    ev += shop.add_product(2, "games", "25.50")
    for cid in (1, 2, 3):
        ev += shop.register(cid)
    ev += shop.place(1, 1, [(1, 2, "10.00"), (2, 1, "25.50")], "2026-03-02T09:00:00")  # 45.50
    ev += shop.pay(1, "2026-03-02T09:10:00")
    ev += shop.ship(1, "2026-03-02T21:00:00")
    ev += shop.place(2, 2, [(2, 2, "25.50")], "2026-03-02T10:00:00")  # 51.00
    ev += shop.pay(2, "2026-03-03T10:00:00")
    ev += shop.place(3, 2, [(1, 1, "10.00")], "2026-03-02T11:00:00", currency="USD")  # 10.00
    ev += shop.pay(3, "2026-03-03T11:30:00")
    ev += shop.place(4, 3, [(1, 5, "10.00")], "2026-03-03T12:00:00")  # refunded
    ev += shop.pay(4, "2026-03-03T12:05:00")
    ev += shop.refund(4, "2026-03-04T12:00:00")
    ev += shop.place(5, 3, [(2, 1, "25.50")], "2026-03-03T13:00:00")  # cancelled after payment
    ev += shop.pay(5, "2026-03-03T13:01:00")
    ev += shop.cancel(5, "2026-03-03T14:00:00", refund=True)
    ev += shop.place(6, 1, [(1, 1, "10.00")], "2026-03-03T15:00:00")  # stays pending
    return ev


# ---- current state --------------------------------------------------------------


def test_order_lifecycle_projects_the_current_state(sink: ClickHouseSink) -> None:
    sink.apply(lifecycle(Shop()), {})
    rows = q(sink, "SELECT id, status, paid_at, shipped_at, total FROM {db}.orders_v ORDER BY id")
    assert [(r[0], r[1]) for r in rows] == [
        (1, "shipped"), (2, "paid"), (3, "paid"), (4, "refunded"), (5, "cancelled"), (6, "pending"),
    ]  # fmt: skip
    assert rows[0][2] == datetime(2026, 3, 2, 9, 10, tzinfo=UTC)
    assert rows[0][3] == datetime(2026, 3, 2, 21, 0, tzinfo=UTC)
    assert rows[0][4] == D("59.50")  # 45.50 + 9.10 tax + 4.90 shipping
    items = q(sink, "SELECT order_id, line_no, product_id, quantity, line_total FROM {db}.order_items_v ORDER BY order_id, line_no")  # fmt: skip
    assert items[:3] == [
        (1, 1, 1, 2, D("20.00")),
        (1, 2, 2, 1, D("25.50")),
        (2, 1, 2, 2, D("51.00")),
    ]
    kinds = q(sink, "SELECT order_id, kind FROM {db}.payments_v ORDER BY id")
    assert kinds == [(1, "capture"), (2, "capture"), (3, "capture"), (4, "capture"), (4, "refund"),
                     (5, "capture"), (5, "refund")]  # fmt: skip


def test_every_event_is_stored_once_with_its_envelopes(sink: ClickHouseSink) -> None:
    events = lifecycle(Shop())
    sink.apply(events, {})
    stored = q(sink, "SELECT event_id, event_type, version, data, changes FROM {db}.events_v")
    assert len(stored) == len(events)
    by_id = {r[0]: r for r in stored}
    placed = next(e for e in events if e.event_type == "OrderPlaced")
    row = by_id[placed.event_id]
    assert row[1] == "OrderPlaced" and row[2] == placed.version
    import orjson

    assert orjson.loads(row[3]) == placed.data
    assert orjson.loads(row[4]) == placed.changes


def test_redelivered_batch_leaves_everything_identical(sink: ClickHouseSink) -> None:
    events = lifecycle(Shop())
    sink.apply(events, {})
    before = snapshot(sink)
    raw = q(sink, "SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.orders)")
    sink.apply(events, {})  # the same batch again (a retry): deduplicated on insert
    assert snapshot(sink) == before
    assert (
        q(sink, "SELECT (SELECT count() FROM {db}.events), (SELECT count() FROM {db}.orders)")
        == raw
    )
    # Redelivered in other batches (after a restart): written again, collapsed by FINAL.
    sink.apply(events[:10], {})
    sink.apply(events[10:], {})
    assert snapshot(sink) == before


def test_retried_batch_spanning_months_is_dropped_on_insert(sink: ClickHouseSink) -> None:
    shop = Shop()
    events = shop.register(1, at="2026-01-31T23:59:59") + shop.register(2, at="2026-02-01T00:00:01")
    events += shop.register(3, at="2026-03-01T00:00:00")
    sink.apply(events, {})
    sink.apply(events, {})
    assert q(sink, "SELECT count(), uniqExact(_partition_id) FROM {db}.events") == [(3, 3)]
    assert q(sink, "SELECT count() FROM {db}.customers") == [(3,)]


def snapshot(sink: ClickHouseSink) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for view in ("orders_v", "order_items_v", "payments_v", "customers_v", "products_v", "events_v",
                 "revenue_daily_v", "revenue_by_product_daily_v", "revenue_by_category_daily_v",
                 "orders_by_status_daily_v", "customer_ltv_v", "funnel_daily_v"):  # fmt: skip
        out[view] = sorted(q(sink, f"SELECT * FROM {{db}}.{view}"), key=repr)
    out["revenue"] = sink.revenue(date(2026, 1, 1), date(2026, 12, 31), "product")
    out["funnel"] = sink.funnel()
    return out


def test_an_older_version_never_overwrites_a_newer_one(sink: ClickHouseSink) -> None:
    shop = Shop()
    shop.add_product(1, "books", "10.00")
    shop.register(1)
    placed = shop.place(1, 1, [(1, 1, "10.00")], "2026-03-02T09:00:00")
    paid = shop.pay(1, "2026-03-02T09:10:00")
    sink.apply(paid, {})
    sink.apply(placed, {})  # late redelivery of the older event
    assert q(sink, "SELECT status FROM {db}.orders_v") == [("paid",)]
    sink.apply(placed + paid, {})
    assert q(sink, "SELECT status FROM {db}.orders_v") == [("paid",)]


def test_version_beyond_64_bits_orders_correctly(sink: ClickHouseSink) -> None:
    def product_event(version: int, price: str) -> DomainEvent:
        after = {"id": 7, "sku": "SKU-0007", "name": "P", "category": "c", "price": price,
                 "stock": 1, "attributes": {}, "active": True,
                 "created_at": "2026-03-01T00:00:00Z", "updated_at": "2026-03-01T00:00:00Z"}  # fmt: skip
        lsn = version >> 16
        source = {"lsn": "0/0", "commit_lsn": "0/0", "txid": 1, "seq": 0, "schema": "public",
                  "table": "products", "snapshot": None, "ts_ms": 0}  # fmt: skip
        return DomainEvent(f"e{version}", "ProductUpdated", 1, "product", "7", version,
                           "2026-03-01T00:00:00.000Z", lsn & (2**64 - 1), {},
                           [{"op": "u", "before": None, "after": after, "unavailable": [], "source": source}])  # fmt: skip

    big = (2**64 - 1) << 16 | 2
    sink.apply([product_event(big, "2.00")], {})
    sink.apply([product_event((2**64 - 1) << 16 | 1, "1.00")], {})
    assert q(sink, "SELECT price FROM {db}.products_v") == [(D("2.00"),)]
    assert q(sink, "SELECT version FROM {db}.events_v ORDER BY version") == [(big - 1,), (big,)]


def test_deleted_order_and_items_disappear_from_the_views(sink: ClickHouseSink) -> None:
    shop = Shop()
    events = shop.add_product(1, "books", "10.00") + shop.register(1)
    events += shop.place(1, 1, [(1, 1, "10.00"), (1, 2, "10.00")], "2026-03-02T09:00:00")
    events += shop.place(2, 1, [(1, 1, "10.00")], "2026-03-02T09:00:00")
    sink.apply(events, {})
    sink.apply(shop.delete_order(1, "2026-03-02T10:00:00"), {})
    assert q(sink, "SELECT id FROM {db}.orders_v") == [(2,)]
    assert q(sink, "SELECT order_id, line_no FROM {db}.order_items_v") == [(2, 1)]
    deleted = q(sink, "SELECT id, is_deleted FROM {db}.orders FINAL WHERE id = 1")
    assert deleted in ([], [(1, 1)])  # FINAL may already drop the tombstone


def test_snapshot_reads_project_like_inserts_and_streamed_changes_win(sink: ClickHouseSink) -> None:
    shop = Shop()
    shop.register(1)
    shop.place(1, 1, [(1, 2, "10.00")], "2026-03-02T09:00:00")
    snapshot_lsn = shop.lsn + 0x100
    reads = [
        RowChange("r", "public", table, KEYS[table], None, dict(shop.rows[(table, key)]), (), (),
                  snapshot_lsn, snapshot_lsn, 0, 0, ms("2026-03-02T09:30:00"), "initial")
        for table, key in (("customers", 1), ("orders", 1), ("order_items", (1, 1)))
    ]  # fmt: skip
    events = [shop.mapper.snapshot(r) for r in reads]
    assert [e.event_type for e in events] == [
        "CustomerSnapshotted", "OrderSnapshotted", "OrderItemSnapshotted",
    ]  # fmt: skip
    sink.apply(events, {})
    assert q(sink, "SELECT id, status FROM {db}.orders_v") == [(1, "pending")]
    assert q(sink, "SELECT order_id, line_no, quantity FROM {db}.order_items_v") == [(1, 1, 2)]
    shop.lsn = snapshot_lsn
    sink.apply(shop.pay(1, "2026-03-02T10:00:00") + events, {})  # a re-read may come again
    assert q(sink, "SELECT id, status FROM {db}.orders_v") == [(1, "paid")]


def test_payment_delete_without_order_id_is_a_generic_event_and_still_applies(
    sink: ClickHouseSink,
) -> None:
    shop = Shop()
    events = shop.place(1, 1, [(1, 1, "10.00")], "2026-03-02T09:00:00")
    events += shop.pay(1, "2026-03-02T09:10:00")
    deleted = shop._tx("2026-03-02T11:00:00", [("d", "payments", {"id": 1}, None, ())])
    assert [(e.event_type, e.aggregate_type) for e in deleted] == [("RowDeleted", "payments")]
    sink.apply(events + deleted, {})
    assert q(sink, "SELECT count() FROM {db}.payments_v") == [(0,)]
    assert q(sink, "SELECT status FROM {db}.orders_v") == [("paid",)]


def test_truncate_hides_rows_written_before_it_even_when_redelivered(sink: ClickHouseSink) -> None:
    shop = Shop()
    added = shop.add_product(1, "books", "10.00") + shop.add_product(2, "games", "5.00")
    sink.apply(added, {})
    truncate = shop.truncate("products", "2026-03-02T00:00:00")
    assert [e.event_type for e in truncate] == ["TableTruncated"]
    sink.apply(truncate, {})
    assert q(sink, "SELECT count() FROM {db}.products_v") == [(0,)]
    readded = shop.add_product(2, "games", "6.00", at="2026-03-02T01:00:00")
    sink.apply(readded + added, {})  # the old inserts come again: still gone
    assert q(sink, "SELECT id, price FROM {db}.products_v") == [(2, D("6.00"))]


def test_table_wide_event_from_every_partition_counts_once(sink: ClickHouseSink) -> None:
    shop = Shop()
    sink.apply(shop.add_product(1, "books", "10.00"), {})
    truncate = shop.truncate("products", "2026-03-02T00:00:00")
    sink.apply(truncate * 6, {})  # published to all six partitions, consumed in one batch
    assert q(sink, "SELECT event_type, count() FROM {db}.events_v GROUP BY event_type ORDER BY 1") == [
        ("ProductAdded", 1), ("TableTruncated", 1),
    ]  # fmt: skip
    assert q(sink, "SELECT count() FROM {db}.products_v") == [(0,)]


def test_unchanged_toast_column_keeps_its_previous_value(sink: ClickHouseSink) -> None:
    shop = Shop()
    sink.apply(shop.register(1, profile={"tier": "gold"}), {})
    # profile arrives as unchanged TOAST (absent from after), in a later batch ...
    sink.apply(shop.change_name(1, "Renamed", "2026-03-02T00:00:00", ("bio", "profile")), {})
    rows = q(sink, "SELECT full_name, profile FROM {db}.customers_v")
    assert rows == [("Renamed", '{"tier":"gold"}')]
    # ... and in the same batch as the row's insert.
    batch = shop.register(2, profile={"tier": "silver"})
    batch += shop.change_name(2, "Two", "2026-03-02T00:00:00", ("bio", "profile"))
    sink.apply(batch, {})
    assert q(sink, "SELECT full_name, profile FROM {db}.customers_v WHERE id = 2") == [
        ("Two", '{"tier":"silver"}')
    ]
    assert sink.toast_unresolved == 0


def test_unavailable_column_of_a_composite_key_row_is_filled_from_storage(
    sink: ClickHouseSink,
) -> None:
    shop = Shop()
    sink.apply(shop.place(1, 1, [(1, 2, "10.00"), (2, 1, "7.00")], "2026-03-02T09:00:00"), {})
    item = {"order_id": 1, "line_no": 2, "product_id": 2, "quantity": 3, "line_total": "21.00"}
    sink.apply(shop._tx("2026-03-02T10:00:00", [("u", "order_items", None, item, ("unit_price",))]), {})  # fmt: skip
    rows = q(sink, "SELECT line_no, quantity, unit_price, line_total FROM {db}.order_items_v ORDER BY line_no")  # fmt: skip
    assert rows == [(1, 2, D("10.00"), D("20.00")), (2, 3, D("7.00"), D("21.00"))]
    assert sink.toast_unresolved == 0


def test_toast_column_of_a_row_never_seen_is_counted_as_unresolved(sink: ClickHouseSink) -> None:
    shop = Shop()
    shop.register(1, profile={"tier": "gold"})  # not applied: the projection started later
    sink.apply(shop.change_name(1, "Late", "2026-03-02T00:00:00", ("bio", "profile")), {})
    assert q(sink, "SELECT full_name, profile FROM {db}.customers_v") == [("Late", "")]
    assert sink.toast_unresolved == 1


# ---- aggregates -------------------------------------------------------------------


def test_revenue_by_day_counts_paid_and_shipped_orders_on_their_payment_day(sink: ClickHouseSink) -> None:  # fmt: skip
    sink.apply(lifecycle(Shop()), {})
    rows = sink.revenue(date(2026, 3, 1), date(2026, 3, 31), "day")
    assert rows == [
        {"day": date(2026, 3, 2), "currency": "EUR", "orders": 1, "revenue": D("45.50")},
        {"day": date(2026, 3, 3), "currency": "EUR", "orders": 1, "revenue": D("51.00")},
        {"day": date(2026, 3, 3), "currency": "USD", "orders": 1, "revenue": D("10.00")},
    ]
    assert sink.revenue(date(2026, 3, 3), date(2026, 3, 3), "day")[0]["day"] == date(2026, 3, 3)
    assert sink.revenue(date(2026, 4, 1), date(2026, 4, 30), "day") == []


def test_revenue_by_product_and_category(sink: ClickHouseSink) -> None:
    sink.apply(lifecycle(Shop()), {})
    by_product = sink.revenue(date(2026, 3, 1), date(2026, 3, 31), "product")
    assert [(r["product_id"], r["category"], r["currency"], r["orders"], r["quantity"], r["revenue"])
            for r in by_product] == [
        (2, "games", "EUR", 2, 3, D("76.50")),
        (1, "books", "EUR", 1, 2, D("20.00")),
        (1, "books", "USD", 1, 1, D("10.00")),
    ]  # fmt: skip
    by_category = sink.revenue(date(2026, 3, 1), date(2026, 3, 31), "category")
    assert [(r["category"], r["currency"], r["revenue"]) for r in by_category] == [
        ("games", "EUR", D("76.50")), ("books", "EUR", D("20.00")), ("books", "USD", D("10.00")),
    ]  # fmt: skip
    # Updates move aggregates exactly: refund order 2, price changes do not touch sold lines.
    shop = Shop()
    events = lifecycle(shop)
    sink.apply(events, {})
    sink.apply(shop.refund(2, "2026-03-05T00:00:00") + shop.change_price(2, "99.00", "2026-03-05T00:00:00"), {})  # fmt: skip
    games = sink.revenue(date(2026, 3, 1), date(2026, 3, 31), "category")[0]
    assert (games["category"], games["revenue"]) == ("games", D("25.50"))
    assert sum(r["revenue"] for r in sink.revenue(date(2026, 3, 1), date(2026, 3, 31), "day")) == D("55.50")  # fmt: skip


def test_revenue_rejects_unknown_grouping_and_reversed_range(sink: ClickHouseSink) -> None:
    with pytest.raises(AnalyticsError, match="group_by"):
        sink.revenue(date(2026, 3, 1), date(2026, 3, 2), "day; DROP TABLE x")
    with pytest.raises(AnalyticsError, match="after"):
        sink.revenue(date(2026, 3, 2), date(2026, 3, 1), "day")


def test_orders_per_status_per_day_and_lifetime_value(sink: ClickHouseSink) -> None:
    sink.apply(lifecycle(Shop()), {})
    status = q(sink, "SELECT day, status, orders FROM {db}.orders_by_status_daily_v ORDER BY day, status")  # fmt: skip
    assert status == [
        (date(2026, 3, 2), "paid", 2), (date(2026, 3, 2), "shipped", 1),
        (date(2026, 3, 3), "cancelled", 1), (date(2026, 3, 3), "pending", 1),
        (date(2026, 3, 3), "refunded", 1),
    ]  # fmt: skip
    ltv = q(sink, "SELECT customer_id, currency, paid, refunded, lifetime_value FROM {db}.customer_ltv_v ORDER BY customer_id, currency")  # fmt: skip
    assert ltv == [
        (1, "EUR", D("59.50"), D("0.00"), D("59.50")),
        (2, "EUR", D("66.10"), D("0.00"), D("66.10")),
        (2, "USD", D("16.90"), D("0.00"), D("16.90")),
        (3, "EUR", D("100.40"), D("100.40"), D("0.00")),
    ]


def test_funnel_counts_steps_reached_and_time_to_ship(sink: ClickHouseSink) -> None:
    sink.apply(lifecycle(Shop()), {})
    f = sink.funnel()
    assert (f["placed"], f["paid"], f["shipped"]) == (6, 5, 1)
    assert f["time_to_ship_s"] == {"avg": 12 * 3600.0, "p50": 12 * 3600.0, "p90": 12 * 3600.0}
    assert f["time_to_pay_s"]["p50"] == 600.0  # of 60, 300, 600, 86400, 88200 s
    day = sink.funnel(date(2026, 3, 2), date(2026, 3, 2))
    assert (day["placed"], day["paid"], day["shipped"]) == (3, 3, 1)


# ---- positions --------------------------------------------------------------------


def test_positions_are_stored_with_the_batch_and_never_move_back(sink: ClickHouseSink) -> None:
    shop = Shop()
    sink.apply(shop.register(1), {("shop.customer.events", 0): Position(10, 500),
                                  ("shop.customer.events", 1): Position(4, 700)})  # fmt: skip
    assert sink.positions() == {("shop.customer.events", 0): Position(10, 500),
                                ("shop.customer.events", 1): Position(4, 700)}  # fmt: skip
    assert sink.watermark() == 500
    sink.apply([], {("shop.customer.events", 0): Position(8, 400)})  # a replayed, older batch
    assert sink.positions()[("shop.customer.events", 0)] == Position(10, 500)
    sink.apply([], {("shop.customer.events", 0): Position(12, 900)})
    assert sink.watermark() == 700


def test_positions_are_per_projection(chdb_backend: Backend, sink: ClickHouseSink) -> None:
    other = ClickHouseSink(chdb_backend, sink.database, projection="rebuild")
    sink.apply([], {("t", 0): Position(1, 1)})
    assert other.positions() == {} and other.watermark() == 0


def test_migrate_is_idempotent(sink: ClickHouseSink) -> None:
    sink.apply(Shop().register(1), {})
    sink.migrate()
    assert q(sink, "SELECT count() FROM {db}.customers_v") == [(1,)]


# ---- read-only SQL ------------------------------------------------------------------


def test_readonly_query_answers_a_select_in_the_analytics_database(sink: ClickHouseSink) -> None:
    sink.apply(lifecycle(Shop()), {})
    columns, rows = sink.readonly_query("SELECT status, count() AS n FROM orders_v GROUP BY status ORDER BY status;", 100, 5)  # fmt: skip
    assert columns == ("status", "n")
    assert rows[0] == ("cancelled", 1)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO orders (id) VALUES (99)", "only reads"),
        ("DROP TABLE orders", "only reads"),
        ("SELECT * FROM file('/etc/hostname', 'LineAsString')", "only reads"),
        ("SELECT 1 SETTINGS readonly = 0", "only reads"),
        ("SELECT 1; DROP TABLE orders", "exactly one"),
        ("SELECT $$ ' $$; DROP TABLE orders; SELECT ' '", "exactly one"),
        ("SELECT number FROM system.numbers LIMIT 1000", "more than 100 rows"),
        ("SELECT count() FROM system.numbers SETTINGS max_execution_time = 0", "only reads"),
        ("SELECT count() FROM numbers(100000000000)", "longer than 0.5 s"),
        ("SELECT 'unterminated", "unterminated"),
    ],
)
def test_readonly_query_refuses(sink: ClickHouseSink, sql: str, message: str) -> None:
    with pytest.raises(AnalyticsError, match=message):
        sink.readonly_query(sql, max_rows=100, timeout_s=0.5)
    assert q(sink, "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'orders'") == [(1,)]  # fmt: skip


def test_readonly_query_refuses_a_statement_over_its_memory_limit(sink: ClickHouseSink) -> None:
    with pytest.raises(AnalyticsError, match="more than 50000000 bytes of memory"):
        sink.readonly_query(
            "SELECT length(groupArray(number)) FROM numbers(100000000)",
            max_rows=10, timeout_s=20, max_memory_bytes=50_000_000,
        )  # fmt: skip
