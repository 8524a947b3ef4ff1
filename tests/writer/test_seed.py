"""Seeding bulk-loads consistent data and leaves the shop ready for commands."""

from __future__ import annotations

import psycopg
import pytest

from writer import commands as c
from writer.db import open_pool
from writer.errors import MigrationError
from writer.migrate import migrate
from writer.seed import seed

CONSISTENCY = {
    "order total is items + tax + shipping": """
        SELECT count(*) FROM orders o
        WHERE o.subtotal <> (SELECT sum(line_total) FROM order_items i WHERE i.order_id = o.id)
           OR o.total <> o.subtotal + o.tax + o.shipping_fee""",
    "every order has items": """
        SELECT count(*) FROM orders o
        WHERE NOT EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id)""",
    "every paid order has one capture of its total": """
        SELECT count(*) FROM orders o
        WHERE o.paid_at IS NOT NULL AND (
            SELECT count(*) FROM payments p
            WHERE p.order_id = o.id AND p.kind = 'capture' AND p.amount = o.total) <> 1""",
    "unpaid orders have no payments": """
        SELECT count(*) FROM orders o JOIN payments p ON p.order_id = o.id
        WHERE o.paid_at IS NULL""",
    "refunded and paid-then-cancelled orders have one refund": """
        SELECT count(*) FROM orders o
        WHERE (o.status = 'refunded' OR (o.status = 'cancelled' AND o.paid_at IS NOT NULL))
          AND (SELECT count(*) FROM payments p
               WHERE p.order_id = o.id AND p.kind = 'refund' AND p.amount = o.total) <> 1""",
    "timestamps follow the lifecycle": """
        SELECT count(*) FROM orders
        WHERE paid_at < placed_at OR shipped_at < paid_at OR refunded_at < paid_at
           OR cancelled_at < placed_at OR updated_at < placed_at""",
    "orders come after their customer": """
        SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id
        WHERE o.placed_at < c.created_at""",
    "items reference existing products": """
        SELECT count(*) FROM order_items i
        WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = i.product_id)""",
    "orders reference existing customers": """
        SELECT count(*) FROM orders o
        WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)""",
}


def _seeded_db(fresh_database, name: str, **counts: int) -> str:
    dsn = fresh_database(name)
    migrate(dsn)
    seed(dsn, seed=42, **counts)
    return dsn


def _rows(dsn: str, query: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def test_seeded_data_is_consistent(fresh_database):
    dsn = _seeded_db(fresh_database, "seed", customers=300, products=40, orders=800)
    counts = dict(
        _rows(
            dsn,
            "SELECT 'customers', count(*) FROM customers UNION ALL"
            " SELECT 'products', count(*) FROM products UNION ALL"
            " SELECT 'orders', count(*) FROM orders",
        )
    )
    assert counts == {"customers": 300, "products": 40, "orders": 800}
    broken = {rule: _rows(dsn, query)[0][0] for rule, query in CONSISTENCY.items()}
    assert broken == dict.fromkeys(CONSISTENCY, 0)
    statuses = {status for (status,) in _rows(dsn, "SELECT DISTINCT status::text FROM orders")}
    assert statuses == {"pending", "paid", "shipped", "cancelled", "refunded"}


def test_the_same_seed_loads_the_same_orders(fresh_database):
    query = "SELECT customer_id, status::text, currency, total, shipping_address FROM orders ORDER BY id"
    one = _rows(_seeded_db(fresh_database, "seed_a", customers=50, products=10, orders=100), query)
    two = _rows(_seeded_db(fresh_database, "seed_b", customers=50, products=10, orders=100), query)
    assert one == two


async def test_commands_work_after_a_seed_because_sequences_were_reset(fresh_database):
    dsn = _seeded_db(fresh_database, "seed_seq", customers=20, products=5, orders=30)
    pool = await open_pool(dsn, 1)
    try:
        customer = await c.register_customer(pool, "after.seed@example.com", "After Seed")
        order = await c.place_order(
            pool, customer.id, [(1, 1)],
            shipping_address={"name": "A", "line1": "B", "city": "C", "postal_code": "1", "country": "DE"},
        )  # fmt: skip
        payment = await c.pay(pool, order.id)
    finally:
        await pool.close()
    assert (customer.id, order.id) == (21, 31)
    assert payment.payment_id == _rows(dsn, "SELECT max(id) FROM payments")[0][0]


def test_seeding_again_with_the_same_seed_appends(fresh_database):
    dsn = _seeded_db(fresh_database, "seed_twice", customers=10, products=5, orders=10)
    seed(dsn, customers=10, orders=10, seed=42)
    assert _rows(dsn, "SELECT count(*), max(id) FROM customers")[0] == (20, 20)
    assert _rows(dsn, "SELECT count(*), max(id) FROM orders")[0] == (20, 20)


def test_seeding_an_unmigrated_database_says_to_migrate(fresh_database):
    dsn = fresh_database("seed_bare")
    with pytest.raises(MigrationError, match="writer migrate"):
        seed(dsn, customers=1)
