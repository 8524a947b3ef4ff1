"""The SQL the commands run, prepared once on every pooled connection.

Commands send ``EXECUTE name(args)`` inside one multi-statement string per
round trip, so Postgres neither parses nor plans them again: with the simple
query protocol that is the only way to have both a single round trip per
transaction phase and cached plans.
"""

from __future__ import annotations

from typing import Any

import psycopg

from writer.lifecycle import TRANSITIONS

__all__ = ["LSN", "PREPARED", "prepare"]

# The consistency token; always the statement after COMMIT.
LSN = "SELECT pg_current_wal_lsn()::text"

_ADD_STOCK = """
UPDATE products SET stock = stock + line.quantity, updated_at = now()
FROM unnest($1::bigint[], $2::int[]) AS line (product_id, quantity)
WHERE products.id = line.product_id
"""


def _in(statuses: frozenset[str]) -> str:
    return ", ".join(f"'{status}'" for status in sorted(statuses))


def _move(action: str) -> str:
    """UPDATE the order to the action's status, only from a status the lifecycle allows."""
    t = TRANSITIONS[action]
    return f"""UPDATE orders SET status = '{t.to}', {t.timestamp_column} = now(), updated_at = now()
            WHERE id = $1 AND status IN ({_in(t.allowed_from)})"""


# Where refunds go back to: the method of the order's capture.
_PAID_WITH = """coalesce((SELECT p.method FROM payments p
    WHERE p.order_id = moved.id AND p.kind = 'capture' ORDER BY p.id LIMIT 1), 'card')"""

PREPARED: dict[str, str] = {
    "shop_register_customer": """(text, text, text, jsonb, text) AS
        INSERT INTO customers (email, full_name, phone, profile, bio)
        VALUES ($1, $2, $3, $4, $5) RETURNING id""",
    "shop_add_product": """(text, text, text, numeric, int, jsonb, text, boolean) AS
        INSERT INTO products (sku, name, category, price, stock, attributes, description, active)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id""",
    "shop_change_price": """(bigint, numeric) AS
        UPDATE products SET price = $2, updated_at = now() WHERE id = $1 RETURNING id""",
    "shop_restock": """(bigint, int) AS
        UPDATE products SET stock = stock + $2, updated_at = now() WHERE id = $1 RETURNING id""",
    "shop_customer_exists": """(bigint) AS SELECT 1 FROM customers WHERE id = $1""",
    # In id order, so that concurrent orders and cancellations never deadlock.
    "shop_lock_products": """(bigint[]) AS
        SELECT id, price, stock, active FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE""",
    "shop_add_stock": f"(bigint[], int[]) AS {_ADD_STOCK}",
    "shop_place_order": """
        (bigint, text, numeric, numeric, numeric, numeric, jsonb,
         int[], bigint[], int[], numeric[], numeric[]) AS
        WITH new_order AS (
            INSERT INTO orders
                (customer_id, currency, subtotal, tax, shipping_fee, total, shipping_address)
            VALUES ($1, $2, $3, $4, $5, $6, $7)
            RETURNING id
        )
        INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, line_total)
        SELECT new_order.id, line.*
        FROM new_order, unnest($8, $9, $10, $11, $12)
            AS line (line_no, product_id, quantity, unit_price, line_total)
        RETURNING order_id""",
    "shop_lock_order": """(bigint) AS
        SELECT o.status, o.total,
               (SELECT p.method FROM payments p
                WHERE p.order_id = o.id AND p.kind = 'capture' ORDER BY p.id LIMIT 1)
        FROM orders o WHERE o.id = $1 FOR UPDATE OF o""",
    "shop_order_lines": """(bigint) AS
        SELECT product_id, quantity FROM order_items WHERE order_id = $1 ORDER BY product_id""",
    # pay, ship and refund change the status only if the lifecycle allows it, and
    # return nothing otherwise: the command then reads the status to say why.
    "shop_pay": f"""(bigint, text, uuid) AS
        WITH moved AS ({_move("pay")} RETURNING id, total)
        INSERT INTO payments (order_id, kind, amount, method, provider_ref)
        SELECT id, 'capture', total, $2, $3 FROM moved RETURNING id, amount""",
    "shop_ship": f"""(bigint) AS {_move("ship")} RETURNING id""",
    "shop_refund": f"""(bigint, uuid) AS
        WITH moved AS ({_move("refund")} RETURNING id, total)
        INSERT INTO payments (order_id, kind, amount, method, provider_ref)
        SELECT id, 'refund', total, {_PAID_WITH}, $2 FROM moved RETURNING id, amount""",
    "shop_order_status": """(bigint) AS SELECT status FROM orders WHERE id = $1""",
    "shop_insert_payment": """(bigint, payment_kind, numeric, text, uuid) AS
        INSERT INTO payments (order_id, kind, amount, method, provider_ref)
        VALUES ($1, $2, $3, $4, $5) RETURNING id""",
    # cancel locks the order and its products first (see commands.cancel).
    "shop_cancel": f"""(bigint) AS {_move("cancel")}""",
}

_PREPARE_ALL = "; ".join(f"PREPARE {name} {body}" for name, body in PREPARED.items())


async def prepare(conn: psycopg.AsyncConnection[Any]) -> None:
    """Prepare every statement on a new connection (the pool's ``configure`` hook)."""
    await conn.execute(_PREPARE_ALL.encode(), prepare=False)
