"""The shop's commands. Each is one transaction and returns its consistency token.

Arguments are validated before the database is touched; business rules that
need current state (stock, order status) are checked on rows locked FOR
UPDATE; a refused command raises a ``DomainError`` and writes nothing.

Two ways of checking a rule against current state:
  * lock, check, write (place_order, cancel): ``BEGIN; SELECT ... FOR
    UPDATE`` in one round trip, the check in Python, then ``writes; COMMIT;
    token`` in a second. Products are locked in id order, so concurrent
    orders and cancellations never deadlock.
  * compare-and-set (pay, ship, refund): one UPDATE that moves the order
    only from a status the lifecycle table allows; if it matched nothing, a
    read of the status says why. One round trip when the command succeeds.

Round trips: each is one multi-statement string sent with the simple query
protocol, parameters bound client-side by psycopg (quoted by libpq, as safe
as server-side binding), running statements prepared once per connection
(``writer.statements``). That is what keeps client and server CPU per
command low enough for the benchmark (see docs/writer.md).

The token (``lsn``) is ``pg_current_wal_lsn()`` read right after COMMIT, in
the same round trip: a position at or past the end of the commit record.
A read model that has applied everything up to it has seen this command.
BEGIN/COMMIT are explicit even around a single statement, because the
statements of one string otherwise share one implicit transaction and the
token would be read before the commit.
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
from psycopg.pq import ExecStatus, TransactionStatus

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
from writer.statements import LSN

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
            await conn.execute("ROLLBACK", prepare=False)


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


Rows = list[tuple[Any, ...]]
Query = str | sql.SQL | sql.Composed


async def _round_trip(conn: Conn, query: Query, params: Mapping[str, Any]) -> list[Rows]:
    """Send several statements as one string; the rows of each one that returns rows.

    A statement with RETURNING that matched nothing contributes an empty list.
    """
    cur = psycopg.AsyncClientCursor(conn)
    await cur.execute(query, params, prepare=False)
    row_sets: list[Rows] = []
    while True:
        result = cur.pgresult
        if result is not None and result.status == ExecStatus.TUPLES_OK:
            row_sets.append(await cur.fetchall())
        if not cur.nextset():
            return row_sets


def _array(values: list[int] | list[Decimal]) -> str:
    """A Postgres array literal of numbers, bound as text: psycopg's generic list
    adaptation costs more client CPU than the whole rest of an order's parameters."""
    return "{" + ",".join(map(str, values)) + "}"


def _lsn(row_sets: list[Rows]) -> str:
    """The token: the last statement of every writing round trip reads it."""
    return str(row_sets[-1][0][0])


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
    params = {
        "email": email,
        "full_name": v.full_name(full_name),
        "phone": v.phone(phone),
        "profile": v.json_object("profile", profile or {}),
        "bio": v.long_text("bio", bio),
    }

    def taken(constraint: str | None) -> DomainError | None:
        return EmailTaken(email) if constraint == "customers_email_key" else None

    async with _transaction(pool, taken) as conn:
        row_sets = await _round_trip(
            conn,
            "BEGIN;"
            " EXECUTE shop_register_customer"
            "(%(email)s, %(full_name)s, %(phone)s, %(profile)s, %(bio)s);"
            " COMMIT; " + LSN,
            params,
        )
        return Result(row_sets[0][0][0], _lsn(row_sets))


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
    params: dict[str, Any] = {"id": customer_id}
    new_email = None
    if not isinstance(email, _Unset):
        new_email = params["email"] = v.email(email)
        sets.append(sql.SQL("email = %(email)s"))
    if not isinstance(full_name, _Unset):
        params["full_name"] = v.full_name(full_name)
        sets.append(sql.SQL("full_name = %(full_name)s"))
    if not isinstance(phone, _Unset):
        params["phone"] = v.phone(phone)
        sets.append(sql.SQL("phone = %(phone)s"))
    if profile is not None:
        params["profile"] = v.json_object("profile", profile)
        sets.append(sql.SQL("profile = profile || %(profile)s::jsonb"))
    if not isinstance(bio, _Unset):
        params["bio"] = v.long_text("bio", bio)
        sets.append(sql.SQL("bio = %(bio)s"))
    if not sets:
        raise InvalidInput("change_profile", "nothing to change (give at least one field)")
    query = sql.SQL(
        "BEGIN; UPDATE customers SET {}, updated_at = now() WHERE id = %(id)s RETURNING id;"
        " COMMIT; " + LSN
    ).format(sql.SQL(", ").join(sets))

    def taken(constraint: str | None) -> DomainError | None:
        if constraint == "customers_email_key" and new_email is not None:
            return EmailTaken(new_email)
        return None

    async with _transaction(pool, taken) as conn:
        row_sets = await _round_trip(conn, query, params)
        if not row_sets[0]:
            raise CustomerNotFound(customer_id)
        return Result(customer_id, _lsn(row_sets))


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
    params = {
        "sku": sku,
        "name": v.product_name(name),
        "category": v.category(category),
        "price": v.money("price", price),
        "stock": v.stock(stock),
        "attributes": v.json_object("attributes", attributes or {}),
        "description": v.long_text("description", description),
        "active": active,
    }

    def taken(constraint: str | None) -> DomainError | None:
        return SkuTaken(sku) if constraint == "products_sku_key" else None

    async with _transaction(pool, taken) as conn:
        row_sets = await _round_trip(
            conn,
            "BEGIN;"
            " EXECUTE shop_add_product(%(sku)s, %(name)s, %(category)s, %(price)s, %(stock)s,"
            " %(attributes)s, %(description)s, %(active)s);"
            " COMMIT; " + LSN,
            params,
        )
        return Result(row_sets[0][0][0], _lsn(row_sets))


async def _update_product(
    pool: Pool, product_id: int, query: Query, params: dict[str, Any]
) -> Result:
    async with _transaction(pool) as conn:
        row_sets = await _round_trip(conn, query, {"id": product_id, **params})
        if not row_sets[0]:
            raise ProductNotFound(product_id)
        return Result(product_id, _lsn(row_sets))


async def change_price(pool: Pool, product_id: int, price: Decimal | int | str) -> Result:
    product_id = v.positive_id("product_id", product_id)
    new_price = v.money("price", price)
    return await _update_product(
        pool,
        product_id,
        "BEGIN; EXECUTE shop_change_price(%(id)s, %(price)s); COMMIT; " + LSN,
        {"price": new_price},
    )


async def restock(pool: Pool, product_id: int, quantity: int) -> Result:
    """Goods received: add ``quantity`` to the product's stock."""
    product_id = v.positive_id("product_id", product_id)
    quantity = v.stock(quantity)
    if quantity == 0:
        raise InvalidInput("quantity", "restocking needs a positive quantity")
    return await _update_product(
        pool,
        product_id,
        "BEGIN; EXECUTE shop_restock(%(id)s, %(quantity)s); COMMIT; " + LSN,
        {"quantity": quantity},
    )


# --- orders ------------------------------------------------------------------

_LOCK_PRODUCTS = "EXECUTE shop_lock_products(%(product_ids)s)"
_ADD_STOCK = "EXECUTE shop_add_stock(%(product_ids)s, %(stock_changes)s)"
_PLACE_ORDER = (
    "EXECUTE shop_place_order(%(customer_id)s, %(currency)s, %(subtotal)s, %(tax)s,"
    " %(shipping_fee)s, %(total)s, %(address)s, %(line_nos)s, %(product_ids)s,"
    " %(quantities)s, %(unit_prices)s, %(line_totals)s); " + _ADD_STOCK + "; COMMIT; " + LSN
)


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

    async with _transaction(pool) as conn:
        customer, products = await _round_trip(
            conn,
            "BEGIN; EXECUTE shop_customer_exists(%(customer_id)s); " + _LOCK_PRODUCTS,
            {"customer_id": customer_id, "product_ids": _array(sorted(p for p, _ in lines))},
        )
        if not customer:
            raise CustomerNotFound(customer_id)
        found = {row[0]: row for row in products}

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

        row_sets = await _round_trip(
            conn,
            _PLACE_ORDER,
            {
                "customer_id": customer_id,
                "currency": currency,
                "subtotal": totals.subtotal,
                "tax": totals.tax,
                "shipping_fee": totals.shipping_fee,
                "total": totals.total,
                "address": address_json,
                "line_nos": _array(list(range(1, len(lines) + 1))),
                "product_ids": _array([product_id for product_id, _ in lines]),
                "quantities": _array([quantity for _, quantity in lines]),
                "unit_prices": _array(unit_prices),
                "line_totals": _array(line_totals),
                "stock_changes": _array([-quantity for _, quantity in lines]),
            },
        )
        return OrderPlaced(
            row_sets[0][0][0],
            _lsn(row_sets),
            currency,
            totals.subtotal,
            totals.tax,
            totals.shipping_fee,
            totals.total,
        )


_LOCK_ORDER = "EXECUTE shop_lock_order(%(order_id)s)"


@dataclass(frozen=True, slots=True)
class _LockedOrder:
    status: str
    total: Decimal
    paid_with: str | None  # method of the capture, where refunds go back to


def _check_transition(order_id: int, action: str, rows: Rows) -> _LockedOrder:
    if not rows:
        raise OrderNotFound(order_id)
    order = _LockedOrder(*rows[0])
    allowed = TRANSITIONS[action].allowed_from
    if order.status not in allowed:
        raise InvalidOrderState(order_id, action, order.status, allowed)
    return order


_INSERT_PAYMENT = (
    "EXECUTE shop_insert_payment(%(order_id)s, %(kind)s, %(amount)s, %(method)s, %(provider_ref)s)"
)
_COMMIT = "COMMIT; " + LSN


def _statements(*parts: str) -> str:
    return "; ".join(parts)


async def _move(
    pool: Pool, order_id: int, action: str, statement: str, params: dict[str, Any]
) -> list[Rows]:
    """Run a compare-and-set status change; if it matched nothing, say why.

    The statement changes the order only from a status the lifecycle allows,
    so the check and the change are one atomic step (no lock held across a
    round trip). Statuses never return to an earlier one, so if the order
    is in an allowed status by the time we look, it got there just now:
    try once more.
    """
    allowed = TRANSITIONS[action].allowed_from
    for _ in range(2):
        async with _transaction(pool) as conn:
            row_sets = await _round_trip(conn, "BEGIN; " + statement + "; " + _COMMIT, params)
            if row_sets[0]:
                return row_sets
            (status_rows,) = await _round_trip(
                conn, "EXECUTE shop_order_status(%(order_id)s)", {"order_id": order_id}
            )
        if not status_rows:
            raise OrderNotFound(order_id)
        status = status_rows[0][0]
        if status not in allowed:
            raise InvalidOrderState(order_id, action, status, allowed)
    raise InvalidOrderState(order_id, action, status, allowed)


async def pay(pool: Pool, order_id: int, *, method: str = "card") -> PaymentRecorded:
    """Capture the order's total: pending -> paid, one capture payment."""
    order_id = v.positive_id("order_id", order_id)
    method = v.payment_method(method)
    row_sets = await _move(
        pool,
        order_id,
        "pay",
        "EXECUTE shop_pay(%(order_id)s, %(method)s, %(provider_ref)s)",
        {"order_id": order_id, "method": method, "provider_ref": uuid.uuid4()},
    )
    payment_id, amount = row_sets[0][0]
    return PaymentRecorded(order_id, _lsn(row_sets), payment_id, amount)


async def ship(pool: Pool, order_id: int) -> Result:
    """paid -> shipped; an unpaid order is never shipped."""
    order_id = v.positive_id("order_id", order_id)
    row_sets = await _move(
        pool, order_id, "ship", "EXECUTE shop_ship(%(order_id)s)", {"order_id": order_id}
    )
    return Result(order_id, _lsn(row_sets))


async def refund(pool: Pool, order_id: int) -> PaymentRecorded:
    """paid|shipped -> refunded, the total paid back the way it was paid (no restock)."""
    order_id = v.positive_id("order_id", order_id)
    row_sets = await _move(
        pool,
        order_id,
        "refund",
        "EXECUTE shop_refund(%(order_id)s, %(provider_ref)s)",
        {"order_id": order_id, "provider_ref": uuid.uuid4()},
    )
    payment_id, amount = row_sets[0][0]
    return PaymentRecorded(order_id, _lsn(row_sets), payment_id, amount)


async def cancel(pool: Pool, order_id: int) -> PaymentRecorded:
    """pending|paid -> cancelled, goods back in stock; a paid order is refunded in full."""
    order_id = v.positive_id("order_id", order_id)
    async with _transaction(pool) as conn:
        order_rows, lines = await _round_trip(
            conn,
            "BEGIN; " + _LOCK_ORDER + "; EXECUTE shop_order_lines(%(order_id)s)",
            {"order_id": order_id},
        )
        order = _check_transition(order_id, "cancel", order_rows)
        refunds = order.status == "paid"
        statements = [_LOCK_PRODUCTS, _ADD_STOCK, "EXECUTE shop_cancel(%(order_id)s)"]
        if refunds:
            statements.append(_INSERT_PAYMENT)
        row_sets = await _round_trip(
            conn,
            _statements(*statements, _COMMIT),
            {
                "order_id": order_id,
                "product_ids": _array([product_id for product_id, _ in lines]),
                "stock_changes": _array([quantity for _, quantity in lines]),
                "kind": "refund",
                "amount": order.total,
                "method": order.paid_with or "card",
                "provider_ref": uuid.uuid4(),
            },
        )
        if refunds:
            return PaymentRecorded(order_id, _lsn(row_sets), row_sets[1][0][0], order.total)
        return PaymentRecorded(order_id, _lsn(row_sets), None, Decimal("0.00"))
