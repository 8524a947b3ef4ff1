"""The shop's commands. Each is one transaction and returns its consistency token.

Arguments are validated before the database is touched; business rules that
need current state (stock, order status) are checked on rows locked FOR
UPDATE; a refused command raises a ``DomainError`` and writes nothing.

Round trips: statements that do not depend on each other's results go out
together in one pipeline, so a command costs one round trip (BEGIN, the
statement, COMMIT and the token) or two (BEGIN and read-and-lock; then the
writes, COMMIT and the token). BEGIN/COMMIT are explicit even around a single
statement: statements pipelined before one Sync share an implicit
transaction, so the token would otherwise be read before the commit.
Products are always locked in id order, so concurrent orders and
cancellations never deadlock.

The token (``lsn``) is ``pg_current_wal_lsn()`` read right after COMMIT on
the same connection: a position at or past the end of the commit record.
A read model that has applied everything up to it has seen this command.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.pq import TransactionStatus

from writer import validation as v
from writer.db import Pool
from writer.errors import (
    CustomerNotFound,
    DomainError,
    EmailTaken,
    InsufficientStock,
    InvalidInput,
    InvalidOrderState,
    OrderNotFound,
    ProductInactive,
    ProductNotFound,
    SkuTaken,
)
from writer.lifecycle import TRANSITIONS
from writer.pricing import SHIPPING_COUNTRIES, check_currency, convert, order_totals

__all__ = [
    "UNSET",
    "OrderPlaced",
    "PaymentRecorded",
    "Result",
    "add_product",
    "cancel",
    "change_price",
    "change_profile",
    "pay",
    "place_order",
    "refund",
    "register_customer",
    "restock",
    "ship",
]

Conn = psycopg.AsyncConnection[tuple[Any, ...]]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()
"""Marks an optional argument of ``change_profile`` that should stay as it is."""


@dataclass(frozen=True, slots=True)
class Result:
    id: int
    lsn: str  # the consistency token, "X/Y"


@dataclass(frozen=True, slots=True)
class OrderPlaced(Result):
    currency: str
    subtotal: Decimal
    tax: Decimal
    shipping_fee: Decimal
    total: Decimal


@dataclass(frozen=True, slots=True)
class PaymentRecorded(Result):
    """``id`` is the order; ``payment_id`` is None when no money moved."""

    payment_id: int | None
    amount: Decimal


_LSN = "SELECT pg_current_wal_lsn()::text"

# CHECK constraints -> the argument that must have been wrong. The validation
# module refuses these values first; this catches anything that slips past.
_CHECKED_FIELDS: Mapping[str, str] = {
    "customers_email_lowercase": "email",
    "customers_email_format": "email",
    "customers_full_name_length": "full_name",
    "customers_phone_format": "phone",
    "customers_profile_object": "profile",
    "customers_bio_length": "bio",
    "products_sku_format": "sku",
    "products_name_length": "name",
    "products_category_format": "category",
    "products_price_non_negative": "price",
    "products_stock_non_negative": "stock",
    "products_attributes_object": "attributes",
    "products_description_length": "description",
    "orders_currency_format": "currency",
    "orders_money_non_negative": "items",
    "orders_total_is_sum": "items",
    "order_items_quantity_positive": "quantity",
    "order_items_line_total_is_product": "items",
    "payments_amount_positive": "amount",
    "payments_method_known": "method",
}


def _database_refusal(exc: psycopg.Error) -> DomainError | None:
    """A constraint or value-range error from Postgres as the domain error it means."""
    diag = exc.diag
    field = _CHECKED_FIELDS.get(diag.constraint_name or "")
    if isinstance(exc, pg_errors.CheckViolation) and field is not None:
        return InvalidInput(field, diag.message_primary or "")
    if isinstance(exc, pg_errors.NumericValueOutOfRange | pg_errors.StringDataRightTruncation):
        return InvalidInput(diag.column_name or "value", diag.message_primary or "out of range")
    return None


async def _rollback(conn: Conn) -> None:
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with suppress(psycopg.Error):  # a broken connection: the pool discards it
            await conn.execute("ROLLBACK")


@asynccontextmanager
async def _transaction(
    pool: Pool, unique: Callable[[str | None], DomainError | None] | None = None
) -> AsyncIterator[Conn]:
    """A pooled connection for one command; anything raised rolls the transaction back.

    ``unique`` maps the name of a violated unique constraint to a domain error.
    """
    async with pool.connection() as conn:
        try:
            yield conn
        except BaseException as exc:
            await _rollback(conn)
            refusal: DomainError | None = None
            if isinstance(exc, pg_errors.UniqueViolation) and unique is not None:
                refusal = unique(exc.diag.constraint_name)
            elif isinstance(exc, psycopg.Error):
                refusal = _database_refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise


async def _scalar(cur: psycopg.AsyncCursor[tuple[Any, ...]]) -> Any:
    """The first column of a statement that returns exactly one row."""
    row = await cur.fetchone()
    assert row is not None, "statement returned no row"
    return row[0]


async def _token(cur: psycopg.AsyncCursor[tuple[Any, ...]]) -> str:
    return str(await _scalar(cur))


# --- customers ---------------------------------------------------------------


async def register_customer(
    pool: Pool,
    email: str,
    full_name: str,
    *,
    phone: str | None = None,
    profile: Mapping[str, Any] | None = None,
    bio: str = "",
) -> Result:
    email = v.email(email)
    row = (
        email,
        v.full_name(full_name),
        v.phone(phone),
        v.json_object("profile", profile or {}),
        v.long_text("bio", bio),
    )

    def taken(constraint: str | None) -> DomainError | None:
        return EmailTaken(email) if constraint == "customers_email_key" else None

    async with _transaction(pool, taken) as conn:
        insert, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await insert.execute(
                "INSERT INTO customers (email, full_name, phone, profile, bio)"
                " VALUES (%s, %s, %s, %s::jsonb, %s) RETURNING id",
                row,
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        return Result(await _scalar(insert), await _token(lsn))


async def change_profile(
    pool: Pool,
    customer_id: int,
    *,
    email: str | _Unset = UNSET,
    full_name: str | _Unset = UNSET,
    phone: str | _Unset | None = UNSET,
    profile: Mapping[str, Any] | None = None,
    bio: str | _Unset = UNSET,
) -> Result:
    """Change the given fields; ``profile`` is merged into the stored one (jsonb ``||``)."""
    customer_id = v.positive_id("customer_id", customer_id)
    sets: list[sql.Composable] = []
    params: list[Any] = []
    new_email = None
    if not isinstance(email, _Unset):
        new_email = v.email(email)
        sets.append(sql.SQL("email = %s"))
        params.append(new_email)
    if not isinstance(full_name, _Unset):
        sets.append(sql.SQL("full_name = %s"))
        params.append(v.full_name(full_name))
    if not isinstance(phone, _Unset):
        sets.append(sql.SQL("phone = %s"))
        params.append(v.phone(phone))
    if profile is not None:
        sets.append(sql.SQL("profile = profile || %s::jsonb"))
        params.append(v.json_object("profile", profile))
    if not isinstance(bio, _Unset):
        sets.append(sql.SQL("bio = %s"))
        params.append(v.long_text("bio", bio))
    if not sets:
        raise InvalidInput("change_profile", "nothing to change (give at least one field)")
    query = sql.SQL(
        "UPDATE customers SET {}, updated_at = now() WHERE id = %s RETURNING id"
    ).format(sql.SQL(", ").join(sets))

    def taken(constraint: str | None) -> DomainError | None:
        if constraint == "customers_email_key" and new_email is not None:
            return EmailTaken(new_email)
        return None

    async with _transaction(pool, taken) as conn:
        update, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await update.execute(query, (*params, customer_id))
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        if await update.fetchone() is None:
            raise CustomerNotFound(customer_id)
        return Result(customer_id, await _token(lsn))


# --- products ----------------------------------------------------------------


async def add_product(
    pool: Pool,
    sku: str,
    name: str,
    category: str,
    price: Decimal | int | str,
    *,
    stock: int = 0,
    attributes: Mapping[str, Any] | None = None,
    description: str = "",
    active: bool = True,
) -> Result:
    sku = v.sku(sku)
    if not isinstance(active, bool):
        raise InvalidInput("active", f"expected true or false, got {active!r}")
    row = (
        sku,
        v.product_name(name),
        v.category(category),
        v.money("price", price),
        v.stock(stock),
        v.json_object("attributes", attributes or {}),
        v.long_text("description", description),
        active,
    )

    def taken(constraint: str | None) -> DomainError | None:
        return SkuTaken(sku) if constraint == "products_sku_key" else None

    async with _transaction(pool, taken) as conn:
        insert, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await insert.execute(
                "INSERT INTO products"
                " (sku, name, category, price, stock, attributes, description, active)"
                " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s) RETURNING id",
                row,
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        return Result(await _scalar(insert), await _token(lsn))


async def change_price(pool: Pool, product_id: int, price: Decimal | int | str) -> Result:
    product_id = v.positive_id("product_id", product_id)
    new_price = v.money("price", price)
    async with _transaction(pool) as conn:
        update, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await update.execute(
                "UPDATE products SET price = %s, updated_at = now() WHERE id = %s RETURNING id",
                (new_price, product_id),
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        if await update.fetchone() is None:
            raise ProductNotFound(product_id)
        return Result(product_id, await _token(lsn))


async def restock(pool: Pool, product_id: int, quantity: int) -> Result:
    """Goods received: add ``quantity`` to the product's stock."""
    product_id = v.positive_id("product_id", product_id)
    quantity = v.stock(quantity)
    if quantity == 0:
        raise InvalidInput("quantity", "restocking needs a positive quantity")
    async with _transaction(pool) as conn:
        update, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await update.execute(
                "UPDATE products SET stock = stock + %s, updated_at = now()"
                " WHERE id = %s RETURNING id",
                (quantity, product_id),
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        if await update.fetchone() is None:
            raise ProductNotFound(product_id)
        return Result(product_id, await _token(lsn))


# --- orders ------------------------------------------------------------------

_INSERT_ORDER = """
WITH new_order AS (
    INSERT INTO orders
        (customer_id, currency, subtotal, tax, shipping_fee, total, shipping_address)
    VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)
    RETURNING id
)
INSERT INTO order_items (order_id, line_no, product_id, quantity, unit_price, line_total)
SELECT new_order.id, line.line_no, line.product_id, line.quantity, line.unit_price,
       line.line_total
FROM new_order,
     unnest(%s::int[], %s::bigint[], %s::int[], %s::numeric[], %s::numeric[])
         AS line (line_no, product_id, quantity, unit_price, line_total)
RETURNING order_id
"""

_LOCK_PRODUCTS = (
    "SELECT id, price, stock, active FROM products WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
)

_ADD_STOCK = """
UPDATE products SET stock = stock + line.quantity, updated_at = now()
FROM unnest(%s::bigint[], %s::int[]) AS line (product_id, quantity)
WHERE products.id = line.product_id
"""


async def place_order(
    pool: Pool,
    customer_id: int,
    items: list[tuple[int, int]],
    *,
    shipping_address: Mapping[str, Any],
    currency: str = "EUR",
) -> OrderPlaced:
    """Insert the order and its items and take the goods from stock, or nothing."""
    customer_id = v.positive_id("customer_id", customer_id)
    lines = v.order_lines(items)
    currency = check_currency(currency)
    address, address_json = v.shipping_address(shipping_address, SHIPPING_COUNTRIES)
    product_ids = sorted(product_id for product_id, _ in lines)

    async with _transaction(pool) as conn:
        customer, products = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await customer.execute("SELECT 1 FROM customers WHERE id = %s", (customer_id,))
            await products.execute(_LOCK_PRODUCTS, (product_ids,))
        if await customer.fetchone() is None:
            raise CustomerNotFound(customer_id)
        found = {row[0]: row for row in await products.fetchall()}

        unit_prices: list[Decimal] = []
        line_totals: list[Decimal] = []
        for product_id, quantity in lines:
            product = found.get(product_id)
            if product is None:
                raise ProductNotFound(product_id)
            _, price, in_stock, active = product
            if not active:
                raise ProductInactive(product_id)
            if in_stock < quantity:
                raise InsufficientStock(product_id, quantity, in_stock)
            unit_price = convert(price, currency)
            unit_prices.append(unit_price)
            line_totals.append(unit_price * quantity)
        totals = order_totals(line_totals, currency, address["country"])

        quantities = [quantity for _, quantity in lines]
        insert, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await insert.execute(
                _INSERT_ORDER,
                (
                    customer_id,
                    currency,
                    totals.subtotal,
                    totals.tax,
                    totals.shipping_fee,
                    totals.total,
                    address_json,
                    list(range(1, len(lines) + 1)),
                    [product_id for product_id, _ in lines],
                    quantities,
                    unit_prices,
                    line_totals,
                ),
            )
            await conn.execute(_ADD_STOCK, ([p for p, _ in lines], [-q for q in quantities]))
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        return OrderPlaced(
            await _scalar(insert),
            await _token(lsn),
            currency,
            totals.subtotal,
            totals.tax,
            totals.shipping_fee,
            totals.total,
        )


_LOCK_ORDER = """
SELECT o.status, o.total,
       (SELECT p.method FROM payments p
        WHERE p.order_id = o.id AND p.kind = 'capture' ORDER BY p.id LIMIT 1)
FROM orders o WHERE o.id = %s FOR UPDATE OF o
"""


@dataclass(frozen=True, slots=True)
class _LockedOrder:
    status: str
    total: Decimal
    paid_with: str | None  # method of the capture, where refunds go back to


def _check_transition(order_id: int, action: str, row: tuple[Any, ...] | None) -> _LockedOrder:
    if row is None:
        raise OrderNotFound(order_id)
    order = _LockedOrder(*row)
    allowed = TRANSITIONS[action].allowed_from
    if order.status not in allowed:
        raise InvalidOrderState(order_id, action, order.status, allowed)
    return order


async def _lock_order(conn: Conn, order_id: int, action: str) -> _LockedOrder:
    """BEGIN, lock the order and check that ``action`` is allowed from its status."""
    order = conn.cursor()
    async with conn.pipeline():
        await conn.execute("BEGIN")
        await order.execute(_LOCK_ORDER, (order_id,))
    return _check_transition(order_id, action, await order.fetchone())


_SET_STATUS: Mapping[str, sql.Composed] = {
    action: sql.SQL(
        "UPDATE orders SET status = {status}, {stamp} = now(), updated_at = now() WHERE id = %s"
    ).format(status=sql.Literal(t.to), stamp=sql.Identifier(t.timestamp_column))
    for action, t in TRANSITIONS.items()
}

_INSERT_PAYMENT = (
    "INSERT INTO payments (order_id, kind, amount, method, provider_ref)"
    " VALUES (%s, %s, %s, %s, %s) RETURNING id"
)


async def pay(pool: Pool, order_id: int, *, method: str = "card") -> PaymentRecorded:
    """Capture the order's total: pending -> paid, one capture payment."""
    order_id = v.positive_id("order_id", order_id)
    method = v.payment_method(method)
    async with _transaction(pool) as conn:
        order = await _lock_order(conn, order_id, "pay")
        payment, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute(_SET_STATUS["pay"], (order_id,))
            await payment.execute(
                _INSERT_PAYMENT, (order_id, "capture", order.total, method, uuid.uuid4())
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        payment_id = await _scalar(payment)
        return PaymentRecorded(order_id, await _token(lsn), payment_id, order.total)


async def ship(pool: Pool, order_id: int) -> Result:
    """paid -> shipped; an unpaid order is never shipped."""
    order_id = v.positive_id("order_id", order_id)
    async with _transaction(pool) as conn:
        await _lock_order(conn, order_id, "ship")
        lsn = conn.cursor()
        async with conn.pipeline():
            await conn.execute(_SET_STATUS["ship"], (order_id,))
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        return Result(order_id, await _token(lsn))


async def cancel(pool: Pool, order_id: int) -> PaymentRecorded:
    """pending|paid -> cancelled, goods back in stock; a paid order is refunded in full."""
    order_id = v.positive_id("order_id", order_id)
    async with _transaction(pool) as conn:
        order_cur, items = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute("BEGIN")
            await order_cur.execute(_LOCK_ORDER, (order_id,))
            await items.execute(
                "SELECT product_id, quantity FROM order_items WHERE order_id = %s"
                " ORDER BY product_id",
                (order_id,),
            )
        order = _check_transition(order_id, "cancel", await order_cur.fetchone())
        lines = await items.fetchall()
        product_ids = [product_id for product_id, _ in lines]
        refunds = order.status == "paid"

        payment, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute(_LOCK_PRODUCTS, (product_ids,))
            await conn.execute(_ADD_STOCK, (product_ids, [quantity for _, quantity in lines]))
            await conn.execute(_SET_STATUS["cancel"], (order_id,))
            if refunds:
                await payment.execute(
                    _INSERT_PAYMENT,
                    (order_id, "refund", order.total, order.paid_with or "card", uuid.uuid4()),
                )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        if refunds:
            payment_id = await _scalar(payment)
            return PaymentRecorded(order_id, await _token(lsn), payment_id, order.total)
        return PaymentRecorded(order_id, await _token(lsn), None, Decimal("0.00"))


async def refund(pool: Pool, order_id: int) -> PaymentRecorded:
    """paid|shipped -> refunded, the total paid back the way it was paid (no restock)."""
    order_id = v.positive_id("order_id", order_id)
    async with _transaction(pool) as conn:
        order = await _lock_order(conn, order_id, "refund")
        payment, lsn = conn.cursor(), conn.cursor()
        async with conn.pipeline():
            await conn.execute(_SET_STATUS["refund"], (order_id,))
            await payment.execute(
                _INSERT_PAYMENT,
                (order_id, "refund", order.total, order.paid_with or "card", uuid.uuid4()),
            )
            await conn.execute("COMMIT")
            await lsn.execute(_LSN)
        payment_id = await _scalar(payment)
        return PaymentRecorded(order_id, await _token(lsn), payment_id, order.total)
