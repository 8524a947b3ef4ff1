"""The shop's business rules, one per test, against the real database."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from cdc.lsn import parse_lsn
from writer import commands as c
from writer.errors import (
    CustomerNotFound,
    EmailTaken,
    InsufficientStock,
    InvalidInput,
    InvalidOrderState,
    OrderNotFound,
    ProductInactive,
    ProductNotFound,
    SkuTaken,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def placed(pool: Any, customer: int, product: int, address: Any, qty: int = 1) -> int:
    return (await c.place_order(pool, customer, [(product, qty)], shipping_address=address)).id


async def test_placing_an_order_takes_the_goods_from_stock(
    pool, db, customer, make_product, address
):
    product = await make_product(stock=10)
    await c.place_order(pool, customer, [(product, 3)], shipping_address=address)
    assert await db.value("SELECT stock FROM products WHERE id = %s", product) == 7


async def test_order_totals_are_items_plus_tax_plus_shipping(
    pool, db, customer, make_product, address
):
    cheap = await make_product(price="9.99")
    other = await make_product(price="5.25")
    order = await c.place_order(
        pool, customer, [(cheap, 2), (other, 1)], shipping_address={**address, "country": "DE"}
    )
    assert order.subtotal == Decimal("25.23")
    assert order.tax == Decimal("4.79")  # 19 % of 25.23 = 4.7937
    assert order.shipping_fee == Decimal("4.95")
    assert order.total == Decimal("34.97")
    row = await db.fetch_one(
        "SELECT subtotal, tax, shipping_fee, total, status::text FROM orders WHERE id = %s",
        order.id,
    )
    assert row == (order.subtotal, order.tax, order.shipping_fee, order.total, "pending")
    lines = await db.fetch(
        "SELECT line_no, product_id, quantity, unit_price, line_total FROM order_items"
        " WHERE order_id = %s ORDER BY line_no",
        order.id,
    )
    assert lines == [
        (1, cheap, 2, Decimal("9.99"), Decimal("19.98")),
        (2, other, 1, Decimal("5.25"), Decimal("5.25")),
    ]


async def test_shipping_is_free_from_fifty_euros(pool, customer, make_product, address):
    product = await make_product(price="50.00")
    order = await c.place_order(pool, customer, [(product, 1)], shipping_address=address)
    assert order.shipping_fee == Decimal("0.00")


async def test_orders_in_other_currencies_convert_unit_prices(
    pool, customer, make_product, address
):
    product = await make_product(price="10.00")
    order = await c.place_order(
        pool, customer, [(product, 1)], shipping_address=address, currency="USD"
    )
    assert (order.currency, order.subtotal) == ("USD", Decimal("10.80"))


async def test_repeated_products_in_an_order_are_merged_into_one_line(
    pool, db, customer, make_product, address
):
    product = await make_product()
    order = await c.place_order(
        pool, customer, [(product, 1), (product, 2)], shipping_address=address
    )
    lines = await db.fetch("SELECT quantity FROM order_items WHERE order_id = %s", order.id)
    assert lines == [(3,)]


async def test_ordering_more_than_in_stock_is_refused(pool, db, customer, make_product, address):
    product = await make_product(stock=2)
    before = await db.state()
    with pytest.raises(InsufficientStock) as refused:
        await c.place_order(pool, customer, [(product, 3)], shipping_address=address)
    assert (refused.value.requested, refused.value.available) == (3, 2)
    assert await db.state() == before


async def test_ordering_an_inactive_product_is_refused(pool, db, customer, make_product, address):
    product = await make_product(active=False)
    before = await db.state()
    with pytest.raises(ProductInactive):
        await c.place_order(pool, customer, [(product, 1)], shipping_address=address)
    assert await db.state() == before


async def test_ordering_for_an_unknown_customer_is_refused(pool, db, make_product, address):
    product = await make_product()
    before = await db.state()
    with pytest.raises(CustomerNotFound):
        await c.place_order(pool, 10**12, [(product, 1)], shipping_address=address)
    assert await db.state() == before


async def test_ordering_an_unknown_product_is_refused(pool, db, customer, make_product, address):
    product = await make_product(stock=5)
    before = await db.state()
    with pytest.raises(ProductNotFound):
        await c.place_order(pool, customer, [(product, 1), (10**12, 1)], shipping_address=address)
    assert await db.state() == before


async def test_concurrent_orders_never_oversell(pool, db, customer, make_product, address):
    product = await make_product(stock=5)
    results = await asyncio.gather(
        *(placed(pool, customer, product, address) for _ in range(12)), return_exceptions=True
    )
    assert sum(isinstance(r, int) for r in results) == 5
    assert all(isinstance(r, int | InsufficientStock) for r in results)
    assert await db.value("SELECT stock FROM products WHERE id = %s", product) == 0


async def test_concurrent_orders_and_cancels_on_shared_products_do_not_deadlock(
    pool, customer, make_product, address
):
    a, b, d = [await make_product(stock=1000) for _ in range(3)]
    orders = [
        (await c.place_order(pool, customer, items, shipping_address=address)).id
        for items in ([(d, 1), (a, 1)], [(b, 1), (d, 1)], [(a, 1), (b, 1), (d, 1)]) * 3
    ]
    work = [c.cancel(pool, order) for order in orders] + [
        c.place_order(pool, customer, items, shipping_address=address)
        for items in ([(d, 1), (b, 1), (a, 1)], [(b, 2), (a, 1)]) * 5
    ]
    results = await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), 20)
    assert [r for r in results if isinstance(r, BaseException)] == []


async def test_paying_records_a_capture_of_the_total(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(price="20.00"), address)
    payment = await c.pay(pool, order, method="paypal")
    assert await db.fetch_one(
        "SELECT o.status::text, p.kind::text, p.amount = o.total, p.method"
        " FROM orders o JOIN payments p ON p.order_id = o.id WHERE o.id = %s",
        order,
    ) == ("paid", "capture", True, "paypal")
    assert payment.payment_id is not None


async def test_paying_twice_is_refused(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    await c.pay(pool, order)
    before = await db.state()
    with pytest.raises(InvalidOrderState) as refused:
        await c.pay(pool, order)
    assert refused.value.status == "paid"
    assert await db.state() == before


async def test_paying_an_unknown_order_is_refused(pool, db):
    with pytest.raises(OrderNotFound):
        await c.pay(pool, 10**12)


async def test_shipping_an_unpaid_order_is_refused(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    before = await db.state()
    with pytest.raises(
        InvalidOrderState, match=r"cannot ship order .* it is pending, expected paid"
    ):
        await c.ship(pool, order)
    assert await db.state() == before


async def test_shipping_a_paid_order_marks_it_shipped(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    await c.pay(pool, order)
    await c.ship(pool, order)
    status, shipped = await db.fetch_one(
        "SELECT status::text, shipped_at IS NOT NULL FROM orders WHERE id = %s", order
    )
    assert (status, shipped) == ("shipped", True)


async def test_cancelling_a_shipped_order_is_refused(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    await c.pay(pool, order)
    await c.ship(pool, order)
    before = await db.state()
    with pytest.raises(InvalidOrderState):
        await c.cancel(pool, order)
    assert await db.state() == before


async def test_cancelling_twice_is_refused(pool, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    await c.cancel(pool, order)
    with pytest.raises(InvalidOrderState):
        await c.cancel(pool, order)


async def test_cancelling_restores_the_stock(pool, db, customer, make_product, address):
    product = await make_product(stock=10)
    order = await placed(pool, customer, product, address, qty=4)
    await c.cancel(pool, order)
    assert await db.value("SELECT stock FROM products WHERE id = %s", product) == 10


async def test_cancelling_a_pending_order_moves_no_money(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    result = await c.cancel(pool, order)
    assert result.payment_id is None
    assert await db.value("SELECT count(*) FROM payments WHERE order_id = %s", order) == 0


async def test_cancelling_a_paid_order_refunds_it_in_full(
    pool, db, customer, make_product, address
):
    order = await placed(pool, customer, await make_product(), address)
    await c.pay(pool, order, method="gift_card")
    await c.cancel(pool, order)
    rows = await db.fetch(
        "SELECT kind::text, amount, method FROM payments WHERE order_id = %s ORDER BY id", order
    )
    assert [(kind, method) for kind, _, method in rows] == [
        ("capture", "gift_card"),
        ("refund", "gift_card"),
    ]
    assert rows[0][1] == rows[1][1]


async def test_refunding_a_pending_order_is_refused(pool, db, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    before = await db.state()
    with pytest.raises(InvalidOrderState):
        await c.refund(pool, order)
    assert await db.state() == before


async def test_refunding_a_shipped_order_pays_back_the_total(
    pool, db, customer, make_product, address
):
    order = await placed(pool, customer, await make_product(stock=10), address)
    await c.pay(pool, order, method="bank_transfer")
    await c.ship(pool, order)
    refund = await c.refund(pool, order)
    status, total = await db.fetch_one(
        "SELECT status::text, total FROM orders WHERE id = %s", order
    )
    assert (status, refund.amount) == ("refunded", total)
    assert (
        await db.value("SELECT method FROM payments WHERE id = %s", refund.payment_id)
        == "bank_transfer"
    )


async def test_refunding_twice_is_refused(pool, customer, make_product, address):
    order = await placed(pool, customer, await make_product(), address)
    await c.pay(pool, order)
    await c.refund(pool, order)
    with pytest.raises(InvalidOrderState):
        await c.refund(pool, order)


async def test_emails_are_stored_lower_case(pool, db, unique):
    email = f"{unique('Mixed.Case')}@Example.COM"
    customer = await c.register_customer(pool, email, "Grace Hopper")
    assert await db.value("SELECT email FROM customers WHERE id = %s", customer.id) == email.lower()


async def test_registering_a_taken_email_is_refused_whatever_its_case(pool, db, unique):
    email = f"{unique('taken')}@example.com"
    await c.register_customer(pool, email, "Grace Hopper")
    before = await db.state()
    with pytest.raises(EmailTaken):
        await c.register_customer(pool, email.upper(), "Someone Else")
    assert await db.state() == before


async def test_changing_to_a_taken_email_is_refused(pool, db, customer, unique):
    email = f"{unique('other')}@example.com"
    await c.register_customer(pool, email, "Grace Hopper")
    with pytest.raises(EmailTaken):
        await c.change_profile(pool, customer, email=email)


async def test_changing_a_profile_merges_the_profile_and_keeps_the_rest(pool, db, unique):
    customer = await c.register_customer(
        pool,
        f"{unique('p')}@example.com",
        "Alan Turing",
        phone="+44 20 7946 0000",
        profile={"tier": "silver", "newsletter": True},
        bio="x" * 5000,
    )
    await c.change_profile(pool, customer.id, profile={"tier": "gold"}, phone=None)
    row = await db.fetch_one(
        "SELECT profile, phone, length(bio), full_name FROM customers WHERE id = %s", customer.id
    )
    assert row == ({"tier": "gold", "newsletter": True}, None, 5000, "Alan Turing")


async def test_changing_the_profile_of_an_unknown_customer_is_refused(pool, db):
    before = await db.state()
    with pytest.raises(CustomerNotFound):
        await c.change_profile(pool, 10**12, full_name="Nobody")
    assert await db.state() == before


async def test_adding_a_taken_sku_is_refused(pool, db, unique):
    sku = unique("DUP-").upper()
    await c.add_product(pool, sku, "Kettle", "kitchen", "30.00")
    with pytest.raises(SkuTaken):
        await c.add_product(pool, sku, "Kettle 2", "kitchen", "31.00")


async def test_a_price_change_leaves_placed_orders_alone(pool, db, customer, make_product, address):
    product = await make_product(price="10.00")
    order = await placed(pool, customer, product, address)
    await c.change_price(pool, product, "12.00")
    assert await db.value(
        "SELECT unit_price FROM order_items WHERE order_id = %s", order
    ) == Decimal("10.00")
    newer = await c.place_order(pool, customer, [(product, 1)], shipping_address=address)
    assert newer.subtotal == Decimal("12.00")


async def test_changing_the_price_of_an_unknown_product_is_refused(pool):
    with pytest.raises(ProductNotFound):
        await c.change_price(pool, 10**12, "1.00")


async def test_restocking_adds_to_the_stock(pool, db, make_product):
    product = await make_product(stock=3)
    await c.restock(pool, product, 7)
    assert await db.value("SELECT stock FROM products WHERE id = %s", product) == 10


async def test_tokens_increase_with_every_command(pool, customer, make_product, address, unique):
    product = await make_product()
    tokens = []
    tokens.append((await c.register_customer(pool, f"{unique('t')}@example.com", "T T")).lsn)
    tokens.append((await c.change_profile(pool, customer, full_name="Ada King")).lsn)
    tokens.append((await c.change_price(pool, product, "11.00")).lsn)
    tokens.append((await c.restock(pool, product, 1)).lsn)
    order = await c.place_order(pool, customer, [(product, 1)], shipping_address=address)
    tokens.append(order.lsn)
    for step in (c.pay, c.ship, c.refund):
        tokens.append((await step(pool, order.id)).lsn)
    positions = [parse_lsn(t) for t in tokens]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


async def test_a_token_is_past_the_commit_it_stands_for(pool, db, customer):
    """After a command returns, its change is visible to any reader at the token."""
    before = parse_lsn(await db.value("SELECT pg_current_wal_lsn()::text"))
    result = await c.change_profile(pool, customer, full_name="Ada Byron")
    insert_lsn = parse_lsn(await db.value("SELECT pg_current_wal_insert_lsn()::text"))
    assert before < parse_lsn(result.lsn) <= insert_lsn


async def test_restocking_past_the_largest_stock_is_refused(pool, db, make_product):
    """The database's range check, mapped to the same error as a validation failure."""
    product = await make_product(stock=2**31 - 10)
    before = await db.state()
    with pytest.raises(InvalidInput):
        await c.restock(pool, product, 100)
    assert await db.state() == before


async def test_concurrent_payments_of_one_order_capture_it_once(
    pool, db, customer, make_product, address
):
    order = await placed(pool, customer, await make_product(), address)
    results = await asyncio.gather(*(c.pay(pool, order) for _ in range(6)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, InvalidOrderState) for r in results if isinstance(r, BaseException))
    assert await db.value("SELECT count(*) FROM payments WHERE order_id = %s", order) == 1


async def test_a_refusal_does_not_drop_the_prepared_statements(
    dsn, customer, make_product, address
):
    """psycopg answers a ROLLBACK with DEALLOCATE ALL once it has auto-prepared
    anything on the connection; the writer's pool must not let it."""
    from writer.db import open_pool

    product = await make_product(stock=1)
    one = await open_pool(dsn, 1)
    try:
        async with one.connection() as conn:
            for _ in range(8):  # what other code sharing the pool might do
                await conn.execute("SELECT 1 WHERE %s", (True,))
        with pytest.raises(InsufficientStock):
            await c.place_order(one, customer, [(product, 5)], shipping_address=address)
        placed_order = await c.place_order(one, customer, [(product, 1)], shipping_address=address)
    finally:
        await one.close()
    assert placed_order.id > 0
