"""The mapping on real row changes: the writer's commands -> Postgres -> pgoutput -> events.

Uses a database of its own (``events_test``) with the writer's schema, a
pgoutput slot read through the SQL interface, the real decoder
(cdc/transactions.py) and the writer's real commands.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.changes import RowChange
from cdc.events import DomainEvent, decode_record, encode_event
from cdc.lsn import parse_lsn
from cdc.mapping import TransactionMapper
from cdc.transactions import TransactionAssembler, TransactionEnd, TransactionStart
from writer import commands
from writer.db import open_pool
from writer.migrate import migrate

PG_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")
DB = "events_test"
ADDRESS = {"name": "Ada", "line1": "Main St 1", "city": "Berlin", "postal_code": "10115",
           "country": "DE"}  # fmt: skip
SHOP_TABLES = ("customers", "products", "orders", "order_items", "payments")


def _dsn(dbname: str) -> str:
    params = conninfo_to_dict(PG_DSN)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shop_dsn() -> str:
    """``events_test``: the writer's schema, migrated (idempotent)."""
    try:
        with psycopg.connect(_dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres at {PG_DSN} is not reachable ({exc}); run `make up` first")
    migrate(_dsn(DB))
    return _dsn(DB)


class Slot:
    def __init__(self, conn: psycopg.Connection[Any], name: str, publication: str) -> None:
        self.conn, self.name, self.publication = conn, name, publication

    def messages(self) -> list[tuple[int, bytes]]:
        rows = self.conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s)",
            (self.name, self.publication),
        ).fetchall()
        return [(parse_lsn(lsn), bytes(data)) for lsn, data in rows]


@pytest.fixture
def slot(shop_dsn: str) -> Iterator[Slot]:
    suffix = uuid.uuid4().hex[:10]
    name, pub = f"events_slot_{suffix}", f"events_pub_{suffix}"
    with psycopg.connect(shop_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(pub)))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        try:
            yield Slot(conn, name, pub)
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(pub)))


@pytest.fixture
async def pool(shop_dsn: str) -> AsyncIterator[Any]:
    pool = await open_pool(shop_dsn, 1)
    try:
        yield pool
    finally:
        await pool.close()


def map_slot(slot: Slot, spool: Path) -> tuple[list[DomainEvent], list[RowChange]]:
    """Everything the slot has, decoded and mapped transaction by transaction."""
    assembler = TransactionAssembler(spool)
    mapper = TransactionMapper()
    events: list[DomainEvent] = []
    changes: list[RowChange] = []
    for lsn, payload in slot.messages():
        for item in assembler.feed(lsn, payload):
            if isinstance(item, TransactionStart):
                mapper.begin(item.commit_lsn, item.commit_ts_ms, item.xid)
            elif isinstance(item, RowChange):
                changes.append(item)
                events.extend(mapper.add(item))
            elif isinstance(item, TransactionEnd):
                events.extend(mapper.end())
    assembler.close()
    return events, changes


def of(events: list[DomainEvent], aggregate_type: str, aggregate_id: object) -> list[str]:
    return [e.event_type for e in events
            if (e.aggregate_type, e.aggregate_id) == (aggregate_type, str(aggregate_id))]  # fmt: skip


async def test_the_writers_commands_become_their_domain_events(
    slot: Slot, pool: Any, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    customer = await commands.register_customer(pool, f"ada-{tag}@example.com", "Ada",
                                                bio="b" * 5000)  # fmt: skip
    mug = await commands.add_product(pool, f"MUG-{tag}", "Mug", "kitchen", "10.00", stock=50)
    pen = await commands.add_product(pool, f"PEN-{tag}", "Pen", "office", "2.50", stock=50)
    placed = await commands.place_order(pool, customer.id, [(mug.id, 2), (pen.id, 3)],
                                        shipping_address=ADDRESS)  # fmt: skip
    await commands.pay(pool, placed.id)
    await commands.ship(pool, placed.id)
    await commands.refund(pool, placed.id)
    second = await commands.place_order(pool, customer.id, [(pen.id, 1)],
                                        shipping_address=ADDRESS)  # fmt: skip
    await commands.pay(pool, second.id)
    await commands.cancel(pool, second.id)
    await commands.change_profile(pool, customer.id, full_name="Ada L.")
    await commands.change_price(pool, mug.id, "12.00")

    events, changes = map_slot(slot, tmp_path)

    assert of(events, "customer", customer.id) == ["CustomerRegistered", "CustomerProfileChanged"]
    assert of(events, "order", placed.id) == ["OrderPlaced", "OrderPaid", "OrderShipped",
                                              "OrderRefunded"]  # fmt: skip
    assert of(events, "order", second.id) == ["OrderPlaced", "OrderPaid", "OrderCancelled"]
    # the default replica identity sends no old row: price and stock changes are updates
    assert set(of(events, "product", mug.id)) == {"ProductAdded", "ProductUpdated"}

    by_type = {(e.aggregate_id, e.event_type): e for e in events}
    order_placed = by_type[(str(placed.id), "OrderPlaced")]
    assert [(i["product_id"], i["quantity"]) for i in order_placed.data["items"]] == [
        (mug.id, 2), (pen.id, 3)]  # fmt: skip
    assert order_placed.data["total"] == str(placed.total)
    paid = by_type[(str(placed.id), "OrderPaid")]
    assert paid.event_version == 2
    assert paid.data["payment"]["amount"] == str(placed.total) and paid.data["payment"]["method"] == "card"
    assert [c["source"]["table"] for c in paid.changes] == ["orders", "payments"]
    cancelled = by_type[(str(second.id), "OrderCancelled")]
    assert cancelled.data["amount"] == str(second.total)  # refunded, since it was paid
    profile = by_type[(str(customer.id), "CustomerProfileChanged")]
    assert profile.data["changed"]["full_name"] == "Ada L."
    assert "bio" not in profile.data["changed"]  # unchanged TOAST value: not sent, not changed

    assert sum(len(e.changes) for e in events) == len(changes)  # lossless
    for event in events:
        assert decode_record(encode_event(event)[1]) == event
