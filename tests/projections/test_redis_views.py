"""Redis user views against the real Redis: lifecycle, money, guards, positions.

Events are made the way cdc makes them: row changes shaped like pgoutput's
(default replica identity: updates carry no before-image, deletes a key-only
one, unchanged TOAST columns are absent from `after`) go through
cdc.mapping.TransactionMapper.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import projections.redis_views as rv
from cdc.changes import RowChange
from cdc.events import DomainEvent
from cdc.mapping import TransactionMapper
from projections.positions import Position
from projections.redis_views import RECENT, RedisViews, digest
from tests.projections.conftest import REDIS_URL, delete_namespace

KEYS = {
    "customers": ("id",),
    "orders": ("id",),
    "order_items": ("order_id", "line_no"),
    "payments": ("id",),
    "products": ("id",),
}
# REDIS_URL's server, database 9 unless REDIS_VIEWS_TEST_URL says otherwise
VIEWS_URL = os.environ.get("REDIS_VIEWS_TEST_URL") or re.sub(r"(/\d*)?$", "/9", REDIS_URL, count=1)
TOPIC = "shop.order.events"
COUNTERS = (b"@n:", b"@spend:", b"@paid")


def iso(ms: int) -> str:
    """A timestamptz as cdc writes it: trailing zeros of the fraction dropped."""
    seconds, milli = divmod(ms, 1000)
    base = f"2026-11-{1 + seconds // 86400:02d}T{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{base}.{milli:03d}".rstrip("0").rstrip(".") + "Z"


class Shop:
    """The write model's row changes for the commands of the shop, as events."""

    def __init__(self, lsn: int = 0x1_0000_0000, step: int = 0x100) -> None:
        self.mapper = TransactionMapper()
        self.lsn = lsn
        self.step = step
        self.ms = 1_000
        self.customers: dict[int, dict[str, Any]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.items: dict[int, list[dict[str, Any]]] = {}
        self.payments: dict[int, dict[str, Any]] = {}
        self.payment_ids = itertools.count(1)

    # ---- transactions

    def _tx(
        self,
        changes: list[
            tuple[str, str, dict[str, Any] | None, dict[str, Any] | None, tuple[str, ...]]
        ],
    ) -> list[DomainEvent]:
        self.lsn += self.step
        self.ms += 1_000
        rows = [
            RowChange(op, "public", table, KEYS.get(table, ("id",)), before, after, unavailable,
                      (), self.lsn - len(changes) + seq, self.lsn, 700, seq, self.ms, None)
            for seq, (op, table, before, after, unavailable) in enumerate(changes)
        ]  # fmt: skip
        self.mapper.begin(self.lsn, self.ms, 700)
        out: list[DomainEvent] = []
        for row in rows:
            out += self.mapper.add(row)
        return out + self.mapper.end()

    def now(self) -> str:
        return iso(self.ms + 1_000)

    # ---- customers

    def register(self, cid: int, name: str = "Ada", bio: str = "b" * 3000) -> list[DomainEvent]:
        row = {
            "id": cid, "email": f"c{cid}@example.com", "full_name": name, "phone": None,
            "profile": {"tier": "gold"}, "bio": bio, "created_at": self.now(), "updated_at": self.now(),
        }  # fmt: skip
        self.customers[cid] = row
        return self._tx([("c", "customers", None, dict(row), ())])

    def change_profile(self, cid: int, **changes: Any) -> list[DomainEvent]:
        """An update; `bio` unchanged is left out of after (unchanged TOAST)."""
        row = self.customers[cid]
        row.update(changes, updated_at=self.now())
        if "bio" in changes:
            return self._tx([("u", "customers", None, dict(row), ())])
        after = {k: v for k, v in row.items() if k != "bio"}
        return self._tx([("u", "customers", None, after, ("bio",))])

    def delete_customer(self, cid: int) -> list[DomainEvent]:
        del self.customers[cid]
        return self._tx([("d", "customers", {"id": cid}, None, ())])

    # ---- orders

    def place(
        self, oid: int, cid: int, prices: list[str] | None = None, currency: str = "EUR"
    ) -> list[DomainEvent]:
        prices = prices or ["10.00"]
        items = [
            {"order_id": oid, "line_no": n, "product_id": 100 + n, "quantity": 1,
             "unit_price": p, "line_total": p}
            for n, p in enumerate(prices, 1)
        ]  # fmt: skip
        total = sum((Decimal(p) for p in prices), Decimal("0.00"))
        row = {
            "id": oid, "customer_id": cid, "status": "pending", "currency": currency,
            "subtotal": str(total), "tax": "0.00", "shipping_fee": "0.00", "total": str(total),
            "shipping_address": {"country": "DE", "city": "Berlin"}, "placed_at": self.now(),
            "paid_at": None, "shipped_at": None, "cancelled_at": None, "refunded_at": None,
            "updated_at": self.now(),
        }  # fmt: skip
        self.orders[oid] = row
        self.items[oid] = items
        return self._tx(
            [("c", "orders", None, dict(row), ())]
            + [("c", "order_items", None, dict(i), ()) for i in items]
        )

    def _status(self, oid: int, status: str, payment: str | None = None) -> list[DomainEvent]:
        row = self.orders[oid]
        row.update({"status": status, f"{status}_at": self.now(), "updated_at": self.now()})
        changes: list[Any] = [("u", "orders", None, dict(row), ())]
        if payment is not None:
            pay = {
                "id": next(self.payment_ids), "order_id": oid, "kind": payment,
                "amount": row["total"], "method": "card", "provider_ref": str(uuid.uuid4()),
                "created_at": self.now(),
            }  # fmt: skip
            self.payments[pay["id"]] = pay
            changes.append(("c", "payments", None, dict(pay), ()))
        return self._tx(changes)

    def pay(self, oid: int) -> list[DomainEvent]:
        return self._status(oid, "paid", "capture")

    def ship(self, oid: int) -> list[DomainEvent]:
        return self._status(oid, "shipped")

    def cancel(self, oid: int) -> list[DomainEvent]:
        was_paid = self.orders[oid]["status"] == "paid"
        return self._status(oid, "cancelled", "refund" if was_paid else None)

    def refund(self, oid: int) -> list[DomainEvent]:
        return self._status(oid, "refunded", "refund")

    def delete_order(self, oid: int) -> list[DomainEvent]:
        del self.orders[oid]
        items = self.items.pop(oid)
        paid = [p for p in self.payments if self.payments[p]["order_id"] == oid]
        for pid in paid:
            del self.payments[pid]
        return self._tx(
            [("d", "payments", {"id": pid}, None, ()) for pid in paid]
            + [
                ("d", "order_items", {"order_id": oid, "line_no": i["line_no"]}, None, ())
                for i in items
            ]
            + [("d", "orders", {"id": oid}, None, ())]
        )

    def truncate(self, *tables: str) -> list[DomainEvent]:
        if "payments" in tables:
            self.payments.clear()
        if "orders" in tables:
            self.orders.clear()
            self.items.clear()
            self.payments.clear()
        if "customers" in tables:
            self.customers.clear()
        return self._tx([("t", t, None, None, ()) for t in tables])

    def add_product(self, pid: int) -> list[DomainEvent]:
        row = {"id": pid, "sku": f"SKU-{pid}", "name": "Tea", "category": "food", "price": "3.50"}
        return self._tx([("c", "products", None, row, ())])

    def snapshot(self) -> list[DomainEvent]:
        """Every current row as a snapshot read (op r) at the next LSN."""
        self.lsn += self.step
        reads = [("customers", r) for r in self.customers.values()]
        reads += [("orders", r) for r in self.orders.values()]
        reads += [("order_items", i) for items in self.items.values() for i in items]
        reads += [("payments", p) for p in self.payments.values()]
        return [
            self.mapper.snapshot(
                RowChange(
                    "r",
                    "public",
                    t,
                    KEYS[t],
                    None,
                    dict(r),
                    (),
                    (),
                    self.lsn,
                    self.lsn,
                    0,
                    0,
                    self.ms,
                    "initial",
                )
            )
            for t, r in reads
        ]


async def dump(client: redis.Redis, namespace: str, *, positions: bool = False) -> dict[bytes, Any]:
    """Every key of the namespace with its whole value (positions left out unless asked).

    Counters that went back to 0 keep their field in Redis; they are left out
    here, so that states reached in different orders compare equal.
    """
    out: dict[bytes, Any] = {}
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        if key.endswith(b":positions") and not positions:
            continue
        kind = await client.type(key)
        if kind == b"hash":
            fields = await client.hgetall(key)
            fields = {k: v for k, v in fields.items() if v != b"0" or not k.startswith(COUNTERS)}
            if fields:
                out[key] = fields
        elif kind == b"zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            out[key] = await client.smembers(key)
        else:
            out[key] = (kind, await client.dump(key))
    return out


def at(offset: int, watermark: int = 0, partition: int = 0) -> dict[tuple[str, int], Position]:
    return {(TOPIC, partition): Position(offset, watermark)}


@pytest.fixture
async def client() -> AsyncIterator[redis.Redis]:
    """A client on a database of these tests' own: SCANs of a namespace stay fast
    however many keys others keep in db 0 (nothing is ever flushed)."""
    client = redis.Redis.from_url(VIEWS_URL)
    try:
        await client.ping()
    except redis.ConnectionError as e:
        await client.aclose()
        pytest.fail(f"Redis at {VIEWS_URL} is not reachable ({e}); run `make up` first")
    yield client
    await client.aclose()


@pytest.fixture
async def namespace(client: redis.Redis) -> AsyncIterator[str]:
    namespace = f"test:{uuid.uuid4().hex}"
    yield namespace
    await delete_namespace(client, namespace)


@pytest.fixture
def views(client: redis.Redis, namespace: str) -> RedisViews:
    return RedisViews(client, namespace)


# ---- lifecycle and money


async def test_place_pay_ship_moves_the_order_through_its_statuses(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1, ["12.50", "7.25"])
    await views.apply(events, at(2))
    assert (await views.order("10"))["status"] == "pending"  # type: ignore[index]
    await views.apply(shop.pay(10), at(3))
    await views.apply(shop.ship(10), at(4))

    order = await views.order("10")
    user = await views.user("1")
    assert order is not None and user is not None
    assert order["status"] == "shipped"
    assert order["customer_id"] == 1
    assert order["total"] == "19.75"
    assert order["paid_at"] is not None and order["shipped_at"] is not None
    assert [i["line_total"] for i in order["items"]] == ["12.50", "7.25"]
    assert user["order_counts"] == {
        "pending": 0,
        "paid": 0,
        "shipped": 1,
        "cancelled": 0,
        "refunded": 0,
    }
    assert user["lifetime_spend"] == {"EUR": "19.75"}
    assert user["recent_orders"][0]["status"] == "shipped"
    assert user["last_activity"] == shop.orders[10]["updated_at"].replace("Z", ".000000Z")


async def test_cancelling_a_paid_order_takes_its_spend_back(views: RedisViews) -> None:
    shop = Shop()
    await views.apply(shop.register(1) + shop.place(10, 1, ["30.00"]) + shop.pay(10), at(3))
    assert (await views.user("1"))["lifetime_spend"] == {"EUR": "30.00"}  # type: ignore[index]
    await views.apply(shop.cancel(10), at(4))
    user = await views.user("1")
    assert user is not None
    assert user["lifetime_spend"] == {}
    assert user["order_counts"]["cancelled"] == 1 and user["order_counts"]["paid"] == 0
    assert (await views.order("10"))["net_paid"] == "0.00"  # type: ignore[index]


async def test_a_refund_subtracts_the_refunded_amount_from_lifetime_spend(
    views: RedisViews,
) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1, ["5.10"]) + shop.pay(10)
    events += shop.place(11, 1, ["2.35"]) + shop.pay(11) + shop.ship(11) + shop.refund(11)
    await views.apply(events, at(7))
    user = await views.user("1")
    assert user is not None
    assert user["lifetime_spend"] == {"EUR": "5.10"}
    assert user["order_counts"]["refunded"] == 1 and user["order_counts"]["paid"] == 1


async def test_spend_is_kept_per_currency(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1, ["1.00"]) + shop.pay(10)
    events += shop.place(11, 1, ["1.08"], currency="USD") + shop.pay(11)
    await views.apply(events, at(5))
    assert (await views.user("1"))["lifetime_spend"] == {"EUR": "1.00", "USD": "1.08"}  # type: ignore[index]


async def test_lifetime_spend_is_exact_over_many_orders(views: RedisViews) -> None:
    shop = Shop()
    rng = random.Random(7)
    events = shop.register(1)
    expected = Decimal("0.00")
    for oid in range(1, 601):
        price = f"{rng.randint(0, 99_999)}.{rng.randint(0, 99):02d}"
        events += shop.place(oid, 1, [price, "0.10", "0.20"]) + shop.pay(oid)
        expected += Decimal(price) + Decimal("0.30")
        if oid % 7 == 0:
            events += shop.refund(oid)
            expected -= Decimal(price) + Decimal("0.30")
    await views.apply(events, at(len(events)))
    user = await views.user("1")
    assert user is not None
    assert Decimal(user["lifetime_spend"]["EUR"]) == expected
    assert user["lifetime_spend"]["EUR"] == str(expected)
    assert user["orders"] == 600


# ---- the guard


async def test_the_same_batch_applied_twice_leaves_every_key_unchanged(
    views: RedisViews, client: redis.Redis, namespace: str
) -> None:
    shop = Shop()
    events = shop.register(1) + shop.change_profile(1, full_name="Ada L.")
    events += (
        shop.place(10, 1, ["3.00", "4.00"]) + shop.pay(10) + shop.place(11, 1) + shop.cancel(11)
    )
    await views.apply(events, at(6))
    first = await dump(client, namespace, positions=True)
    await views.apply(events, at(6))
    assert await dump(client, namespace, positions=True) == first
    assert views.ops_skipped == views.ops_applied


async def test_an_older_event_after_a_newer_one_is_ignored(views: RedisViews) -> None:
    shop = Shop()
    placed = shop.register(1) + shop.place(10, 1)
    paid = shop.pay(10)
    shipped = shop.ship(10)
    await views.apply(placed + paid + shipped, at(4))
    await views.apply(paid, at(4))
    await views.apply(placed, at(4))
    order, user = await views.order("10"), await views.user("1")
    assert order is not None and user is not None
    assert order["status"] == "shipped"
    assert user["order_counts"]["shipped"] == 1 and user["orders"] == 1


async def test_redelivered_events_never_count_twice(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1)
    for oid in range(1, 6):
        events += shop.place(oid, 1, ["1.00"]) + shop.pay(oid)
    for start in range(0, len(events), 3):  # overlapping redeliveries, as after crashes
        await views.apply(events[start : start + 5], at(start))
    await views.apply(events, at(len(events)))
    user = await views.user("1")
    assert user is not None
    assert user["order_counts"]["paid"] == 5 and user["orders"] == 5
    assert user["lifetime_spend"] == {"EUR": "5.00"}
    assert len(user["recent_orders"]) == 5


async def test_versions_beyond_2_to_the_53_compare_exactly(views: RedisViews) -> None:
    lsn = (1 << 62) + 1  # versions near 2^78: neighbours are equal as doubles
    shop = Shop(lsn=lsn, step=1)
    placed = shop.register(1) + shop.place(10, 1)
    paid = shop.pay(10)
    assert float(paid[0].version) == float(paid[0].version - (1 << 16))
    await views.apply(placed + paid, at(1))
    await views.apply(placed, at(1))
    assert (await views.order("10"))["status"] == "paid"  # type: ignore[index]


async def test_an_unavailable_toast_column_keeps_the_stored_profile_value(
    views: RedisViews,
) -> None:
    shop = Shop()
    bio = "a long biography " * 500
    events = shop.register(1, bio=bio) + shop.change_profile(1, full_name="Ada King")
    assert events[-1].changes[0]["unavailable"] == ["bio"]
    assert "bio" not in events[-1].changes[0]["after"]
    await views.apply(events, at(2))
    profile = (await views.user("1"))["profile"]  # type: ignore[index]
    assert profile["full_name"] == "Ada King"
    assert profile["bio"] == bio


async def test_a_toast_column_arriving_late_is_filled_in_by_the_older_write(
    views: RedisViews,
) -> None:
    shop = Shop()
    registered = shop.register(1, bio="first")
    renamed = shop.change_profile(1, full_name="Ada King")
    await views.apply(renamed, at(1))
    await views.apply(registered, at(1))
    profile = (await views.user("1"))["profile"]  # type: ignore[index]
    assert profile["full_name"] == "Ada King" and profile["bio"] == "first"


async def test_a_kept_toast_value_is_taken_whole_from_the_stored_row(views: RedisViews) -> None:
    shop = Shop()
    bio = 'quotes " and \\ backslashes, {braces}, [brackets], commas, "bio": 1, ünïcödé ' * 50
    events = shop.register(1, bio=bio)
    shop.customers[1]["profile"] = {"bio": "a nested decoy", "n": 12345678901234567890}
    events += shop.change_profile(1, bio=bio)  # bio sent again, so the row holds it
    events += shop.change_profile(1, full_name="Ada King")  # bio unavailable
    await views.apply(events, at(3))
    profile = (await views.user("1"))["profile"]  # type: ignore[index]
    assert profile["bio"] == bio
    assert profile["profile"] == {"bio": "a nested decoy", "n": 12345678901234567890}
    assert profile["full_name"] == "Ada King"


async def test_an_order_column_left_out_as_unchanged_toast_keeps_its_value(
    views: RedisViews,
) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1)
    paid = shop.pay(10)
    del paid[0].changes[0]["after"]["shipping_address"]
    paid[0].changes[0]["unavailable"] = ["shipping_address"]
    await views.apply(events + paid, at(3))
    order = await views.order("10")
    assert order is not None
    assert order["status"] == "paid"
    assert order["shipping_address"] == {"country": "DE", "city": "Berlin"}


# ---- the recent list, deletes, truncates, snapshots, other events


async def test_recent_orders_are_newest_first_and_trimmed_to_twenty(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1)
    for oid in range(1, 31):
        events += shop.place(oid, 1, [f"{oid}.00"])
    random.Random(3).shuffle(events)  # placed_at, not arrival, orders the list
    await views.apply(events, at(31))
    user = await views.user("1")
    assert user is not None
    assert [o["order_id"] for o in user["recent_orders"]] == [str(o) for o in range(30, 10, -1)]
    assert len(user["recent_orders"]) == RECENT
    assert user["recent_orders"][0] == {
        "order_id": "30", "status": "pending", "total": "30.00", "currency": "EUR",
        "placed_at": shop.orders[30]["placed_at"],
    }  # fmt: skip
    assert user["order_counts"]["pending"] == 30


async def test_orders_placed_at_the_same_time_rank_by_id_as_numbers(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1)
    for oid in (9, 10, 100):
        events += shop.place(oid, 1)
        shop.orders[oid]["placed_at"] = "2026-11-26T12:00:00Z"
        events[-1].changes[0]["after"]["placed_at"] = "2026-11-26T12:00:00Z"
    await views.apply(events, at(4))
    user = await views.user("1")
    assert [o["order_id"] for o in user["recent_orders"]] == ["100", "10", "9"]  # type: ignore[index]


async def test_a_deleted_order_leaves_the_counts_the_spend_and_the_list(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1) + shop.place(11, 1, ["4.00"]) + shop.pay(11)
    events += shop.delete_order(11)
    await views.apply(events, at(5))
    user = await views.user("1")
    assert user is not None
    assert await views.order("11") is None
    assert user["orders"] == 1 and user["order_counts"]["pending"] == 1
    assert [o["order_id"] for o in user["recent_orders"]] == ["10"]


async def test_a_deleted_customer_has_no_profile_but_keeps_its_order_stats(
    views: RedisViews,
) -> None:
    shop = Shop()
    events = shop.register(1) + shop.register(2) + shop.place(10, 1) + shop.delete_customer(2)
    await views.apply(events, at(4))
    assert (await views.user("2"))["profile"] is None  # type: ignore[index]
    assert (await views.user("1"))["orders"] == 1  # type: ignore[index]


async def test_unknown_ids_read_as_none(views: RedisViews) -> None:
    await views.apply(Shop().register(1), at(1))
    assert await views.user("404") is None
    assert await views.order("404") is None


async def test_a_truncate_of_orders_clears_order_views_and_their_stats(views: RedisViews) -> None:
    shop = Shop()
    events = shop.register(1) + shop.place(10, 1) + shop.pay(10)
    events += shop.truncate("orders", "order_items", "payments")
    await views.apply(events, at(4))
    await views.apply(events[:3], at(4))  # redelivered pre-truncate events stay out
    user = await views.user("1")
    assert user is not None
    assert await views.order("10") is None
    assert user["orders"] == 0 and user["lifetime_spend"] == {} and user["recent_orders"] == []
    assert user["profile"] is not None


async def test_a_truncate_seen_again_on_another_partition_keeps_later_orders(
    views: RedisViews,
) -> None:
    shop = Shop()
    before = shop.register(1) + shop.place(10, 1)
    truncate = shop.truncate("orders", "order_items")
    after = shop.place(11, 1)
    await views.apply(before + truncate + after, at(4, partition=0))
    await views.apply(truncate, at(1, partition=1))  # the copy published to partition 1
    user = await views.user("1")
    assert user is not None
    assert await views.order("10") is None
    assert (await views.order("11"))["items"] != []  # type: ignore[index]
    assert [o["order_id"] for o in user["recent_orders"]] == ["11"]


async def test_a_snapshot_builds_the_same_views_as_the_stream(
    client: redis.Redis, namespace: str
) -> None:
    shop = Shop()
    streamed = shop.register(1) + shop.place(10, 1, ["2.00"]) + shop.pay(10) + shop.place(11, 1)
    snapshot = shop.snapshot()
    assert {e.event_type for e in snapshot} == {
        "CustomerSnapshotted", "OrderSnapshotted", "OrderItemSnapshotted", "PaymentSnapshotted",
    }  # fmt: skip
    a = RedisViews(client, f"{namespace}:a")
    b = RedisViews(client, f"{namespace}:b")
    await a.apply(streamed, at(5))
    await b.apply(snapshot, at(5))
    for oid in ("10", "11"):
        assert await a.order(oid) == await b.order(oid) is not None
    assert await a.user("1") == await b.user("1") is not None


async def test_events_of_other_tables_are_accepted_and_leave_no_view(
    views: RedisViews, client: redis.Redis, namespace: str
) -> None:
    shop = Shop()
    events = shop.add_product(5)
    events.append(
        DomainEvent("x:1", "SomethingNew", 3, "loyalty", "9", 1 << 40, "2026-11-26T00:00:00.000Z",
                    1 << 24, {}, [])
    )  # fmt: skip
    await views.apply(events, at(2))
    assert views.events_applied == 2
    assert list(await dump(client, namespace)) == []
    assert await views.positions() == at(2)


# ---- positions and the watermark


async def test_positions_never_move_backwards(views: RedisViews) -> None:
    await views.apply([], {(TOPIC, 0): Position(100, 5000), (TOPIC, 1): Position(7, 10)})
    await views.apply([], {(TOPIC, 0): Position(40, 3000), (TOPIC, 1): Position(9, 20)})
    assert await views.positions() == {
        (TOPIC, 0): Position(100, 5000),
        (TOPIC, 1): Position(9, 20),
    }


async def test_a_batch_failing_half_way_leaves_the_positions_where_they_were(
    views: RedisViews, client: redis.Redis, namespace: str
) -> None:
    shop = Shop()
    await views.apply(shop.register(1), at(1, watermark=100))
    events = shop.place(10, 1) + shop.place(11, 1)
    await client.set(f"{namespace}:order:11", "in the way")  # WRONGTYPE for the script
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await views.apply(events, at(3, watermark=300))
    assert await views.positions() == at(1, watermark=100)
    await client.delete(f"{namespace}:order:11")
    await views.apply(events, at(3, watermark=300))  # redelivered: applies cleanly
    assert (await views.user("1"))["orders"] == 2  # type: ignore[index]
    assert await views.positions() == at(3, watermark=300)


def _orders(shop: Shop, first: int, n: int) -> list[DomainEvent]:
    events: list[DomainEvent] = []
    for oid in range(first, first + n):
        events += shop.place(oid, 1, ["2.50", "1.25"]) + shop.pay(oid)
    return events


async def test_a_batch_of_more_ops_than_a_script_takes_is_applied_in_parts_alike(
    client: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = Shop()
    events = shop.register(1) + shop.register(2) + _orders(shop, 10, 7) + shop.cancel(12)
    events += shop.change_profile(2, full_name="Bo") + shop.ship(10)
    whole = RedisViews(client, f"{namespace}:a")
    await whole.apply(events, at(9, watermark=900))
    monkeypatch.setattr("projections.redis_views.CHUNK_OPS", 3)
    parted = RedisViews(client, f"{namespace}:b")
    # 10 ops: 3 customer writes (a profile change has another shape than the register it
    # follows, so they do not merge) and 7 orders
    assert len(parted.prepare(events)) == 4
    await parted.apply(events, at(9, watermark=900))
    a = await dump(client, f"{namespace}:a", positions=True)
    b = await dump(client, f"{namespace}:b", positions=True)
    assert {k[len(namespace) + 2 :]: v for k, v in a.items()} == {
        k[len(namespace) + 2 :]: v for k, v in b.items()
    }  # the same views and positions, and no part key left behind
    assert parted.ops_applied == whole.ops_applied and parted.events_applied == len(events)
    await parted.apply(events, at(9, watermark=900))  # redelivered whole: nothing changes
    assert await dump(client, f"{namespace}:b", positions=True) == b


async def test_a_batch_in_parts_is_one_round_trip_and_survives_a_script_flush(
    views: RedisViews, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = Shop()
    monkeypatch.setattr("projections.redis_views.CHUNK_OPS", 2)
    await views.apply(shop.register(1), at(1))
    exists_before = (await client.info("commandstats")).get("cmdstat_script|exists", {})
    pipelines: list[int] = []
    execute = redis.client.Pipeline.execute

    async def counted(self, raise_on_error=True):  # type: ignore[no-untyped-def]
        pipelines.append(len(self.command_stack))
        return await execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counted)
    await views.apply(_orders(shop, 10, 5), at(2))  # 5 ops: 3 parts
    assert pipelines == [3]  # the three EVALSHAs, sent together
    exists_after = (await client.info("commandstats")).get("cmdstat_script|exists", {})
    assert exists_after == exists_before  # and nothing asked before them
    await client.script_flush()  # as after a Redis restart: NOSCRIPT to every part
    await views.apply(_orders(shop, 20, 5), at(3))
    assert pipelines == [3, 3, 3]  # sent again once the script was loaded
    assert (await views.user("1"))["orders"] == 10  # type: ignore[index]
    assert await views.positions() == at(3)


async def test_a_part_that_fails_stops_the_parts_after_it_and_the_positions(
    views: RedisViews, client: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop = Shop()
    await views.apply(shop.register(1), at(1, watermark=100))
    events = _orders(shop, 10, 6)  # one op per order: parts 10-11, 12-13, 14-15
    monkeypatch.setattr("projections.redis_views.CHUNK_OPS", 2)
    await client.set(f"{namespace}:order:12", "in the way")  # WRONGTYPE in the 2nd part
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await views.apply(events, at(5, watermark=500))
    assert await views.positions() == at(1, watermark=100)
    assert await views.order("11") is not None  # the 1st part stays: replays are harmless
    assert await views.order("14") is None and await views.order("15") is None  # refused
    assert (await views.user("1"))["orders"] == 2  # type: ignore[index]
    # the gate of the failed batch expires on its own
    gates = [k async for k in client.scan_iter(match=f"{namespace}:part:*")]
    assert len(gates) == 1 and 0 < await client.ttl(gates[0]) <= 3600
    await client.delete(f"{namespace}:order:12")
    await views.apply(events, at(5, watermark=500))  # redelivered: applies cleanly
    assert (await views.user("1"))["orders"] == 6  # type: ignore[index]
    assert await views.positions() == at(5, watermark=500)


async def test_watermark_is_the_minimum_over_partitions(views: RedisViews) -> None:
    await views.apply([], {(TOPIC, 0): Position(1, 900), (TOPIC, 1): Position(1, 700)})
    await views.apply([], {("shop.customer.events", 0): Position(1, 800)})
    assert await views.watermark() == 700


async def test_a_partition_not_seen_yet_holds_the_watermark_at_zero(
    client: redis.Redis, namespace: str
) -> None:
    views = RedisViews(client, namespace, partitions=[(TOPIC, 0), (TOPIC, 1)])
    await views.apply([], {(TOPIC, 0): Position(1, 900)})
    assert await views.watermark() == 0
    await views.apply([], {(TOPIC, 1): Position(1, 800)})
    assert await views.watermark() == 800


async def test_a_stored_position_of_another_topic_does_not_count(
    client: redis.Redis, namespace: str
) -> None:
    """A rebuild stores every topic's positions in the new generation (one consumer for all
    three); the product topic's never move after it, and must not hold the watermark."""
    views = RedisViews(client, namespace, partitions=[(TOPIC, 0)])
    await views.apply([], {(TOPIC, 0): Position(5, 900), ("shop.product.events", 0): Position(3, 100)})
    assert await views.watermark() == 900
    # a partition added to one of its own topics since its partitions were read counts
    await views.apply([], {(TOPIC, 1): Position(2, 400)})
    assert await views.watermark() == 400


async def test_watermark_of_an_empty_projection_is_zero(views: RedisViews) -> None:
    assert await views.watermark() == 0


# ---- convergence


def _history(data: st.DataObject) -> list[DomainEvent]:
    """A random history of a few customers and orders, as events in commit order."""
    shop = Shop()
    events: list[DomainEvent] = []
    for cid in (1, 2):
        events += shop.register(cid, bio=f"bio {cid}")
    next_order = 1
    moves = data.draw(st.lists(st.sampled_from(
        ["place", "pay", "ship", "cancel", "refund", "profile", "bio", "delete", "truncate"]
    ), min_size=1, max_size=14))  # fmt: skip
    for move in moves:
        live = list(shop.orders)
        if move == "place":
            cid = data.draw(st.sampled_from(sorted(shop.customers) or [1]))
            if cid not in shop.customers:
                events += shop.register(cid)
            cents = data.draw(st.integers(0, 10_000))
            events += shop.place(next_order, cid, [f"{cents // 100}.{cents % 100:02d}", "0.99"])
            next_order += 1
        elif move in ("profile", "bio") and shop.customers:
            cid = data.draw(st.sampled_from(sorted(shop.customers)))
            extra = {"bio": f"bio {len(events)}"} if move == "bio" else {}
            events += shop.change_profile(cid, full_name=f"name {len(events)}", **extra)
        elif move == "truncate" and data.draw(st.booleans()):
            tables = data.draw(st.sampled_from([
                ("orders", "order_items", "payments"),
                ("payments",),
                ("customers", "orders", "order_items", "payments"),
            ]))  # fmt: skip
            events += shop.truncate(*tables)
        elif live:
            oid = data.draw(st.sampled_from(live))
            status = shop.orders[oid]["status"]
            allowed = {
                "pay": status == "pending", "ship": status == "paid",
                "cancel": status in ("pending", "paid"), "refund": status in ("paid", "shipped"),
                "delete": True,
            }  # fmt: skip
            if allowed.get(move):
                events += getattr(shop, {"delete": "delete_order"}.get(move, move))(oid)
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_delivery_order_with_duplicates_converges_to_the_in_order_state(
    data: st.DataObject,
) -> None:
    events = _history(data)
    shuffled = data.draw(
        st.permutations(events + data.draw(st.lists(st.sampled_from(events), max_size=10)))
    )
    cuts = sorted(data.draw(st.sets(st.integers(0, len(shuffled)), max_size=5)))

    async def run() -> None:
        client = redis.Redis.from_url(VIEWS_URL)
        base = f"test:{uuid.uuid4().hex}"
        try:
            in_order, any_order = RedisViews(client, f"{base}:a"), RedisViews(client, f"{base}:b")
            for event in sorted(events, key=lambda e: e.version):
                await in_order.apply([event], {})
            for lo, hi in itertools.pairwise([0, *cuts, len(shuffled)]):
                await any_order.apply(shuffled[lo:hi], {})
            a, b = await dump(client, f"{base}:a"), await dump(client, f"{base}:b")
            assert {k[len(base) + 2 :]: v for k, v in a.items()} == {
                k[len(base) + 2 :]: v for k, v in b.items()
            }
        finally:
            await delete_namespace(client, base)
            await client.aclose()

    asyncio.run(run())


# ---- merging within a batch


async def merged_against_one_by_one(
    client: redis.Redis,
    base: str,
    events: list[DomainEvent],
    first: int = 0,
    batch: list[DomainEvent] | None = None,
) -> RedisViews:
    """`events` one at a time under <base>:a; under <base>:b events[:first] one at a time,
    then `batch` (default: the rest) as one batch. Every key must be equal. Returns b."""
    alone, merged = RedisViews(client, f"{base}:a"), RedisViews(client, f"{base}:b")
    for event in events:
        await alone.apply([event], {})
    for event in events[:first]:
        await merged.apply([event], {})
    await merged.apply(events[first:] if batch is None else batch, at(1))
    a, b = await dump(client, f"{base}:a"), await dump(client, f"{base}:b")
    assert {k[len(base) + 2 :]: v for k, v in a.items()} == {
        k[len(base) + 2 :]: v for k, v in b.items()
    }
    return merged


async def test_a_batch_merges_the_writes_of_one_row_into_one_op(
    client: redis.Redis, namespace: str
) -> None:
    shop = Shop()
    events = shop.register(1)
    for n in range(3):
        events += shop.change_profile(1, full_name=f"Ada {n}")  # bio unchanged: TOAST
    events += shop.place(10, 1, ["3.00", "4.00"]) + shop.pay(10) + shop.ship(10)
    fields: list[str] = []
    # the 2nd and 3rd profile changes into the 1st (the register differs in shape: its
    # bio is there), pay's and ship's order writes into place's
    assert digest(events, fields) == (10, 4)
    assert fields.count("C") == 2
    assert fields.count("G") == 1
    await merged_against_one_by_one(client, namespace, events)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_writes_merged_in_a_batch_end_as_if_applied_one_by_one(data: st.DataObject) -> None:
    """A state built one event at a time, then the rest of the history in one batch (with
    older events mixed in, so that merged writes meet newer stored ones): the same keys
    as the whole history applied one event at a time."""
    events = _history(data)
    k = data.draw(st.integers(0, len(events)))
    older = data.draw(st.lists(st.sampled_from(events[:k]), max_size=6)) if k else []
    batch = events[k:] + older
    if data.draw(st.booleans()):
        batch.sort(key=lambda e: e.version)

    chunk = data.draw(st.sampled_from([rv.CHUNK_OPS, 1, 2, 3]))  # the batch in parts too

    async def run() -> None:
        client = redis.Redis.from_url(VIEWS_URL)
        base = f"test:{uuid.uuid4().hex}"
        saved, rv.CHUNK_OPS = rv.CHUNK_OPS, chunk
        try:
            await merged_against_one_by_one(client, base, events, k, batch)
        finally:
            rv.CHUNK_OPS = saved
            await delete_namespace(client, base)
            await client.aclose()

    asyncio.run(run())


async def test_writes_of_an_order_that_changes_customer_or_loses_a_field_are_not_merged(
    client: redis.Redis, namespace: str
) -> None:
    """Two cases where the newest write alone would not do: an order moved to another
    customer (each keeps its own last activity) and a write without a currency (the
    stored one stays)."""
    shop = Shop()
    events = shop.register(1) + shop.register(2) + shop.place(10, 1) + shop.place(11, 1)
    moved = shop.orders[10]
    moved.update(customer_id=2, updated_at=shop.now())
    events += shop._tx([("u", "orders", None, dict(moved), ())])
    bare = shop.orders[11]
    bare.update(currency=None, updated_at=shop.now())
    events += shop._tx([("u", "orders", None, dict(bare), ())]) + shop.pay(11)
    fields: list[str] = []
    assert digest(events, fields)[1] == 0  # pay keeps currency None: nothing merges
    views = await merged_against_one_by_one(client, namespace, events)
    user = await views.user("1")
    assert user is not None and user["lifetime_spend"] == {"EUR": "10.00"}
