"""Bad input is refused with InvalidInput naming the field, and writes nothing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from writer import commands as c
from writer.errors import DomainError, InvalidInput

GOOD_ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "1 Main St",
    "city": "Paris",
    "postal_code": "75001",
    "country": "FR",
}

# (command, kwargs with placeholders, the field the error must name)
CUSTOMER_CASES = [
    ({"email": "not-an-email"}, "email"),
    ({"email": "two@@example.com"}, "email"),
    ({"email": "a b@example.com"}, "email"),
    ({"email": "x" * 250 + "@example.com"}, "email"),
    ({"email": 42}, "email"),
    ({"full_name": ""}, "full_name"),
    ({"full_name": "   "}, "full_name"),
    ({"full_name": "n" * 201}, "full_name"),
    ({"full_name": "tab\there"}, "full_name"),
    ({"phone": "call me"}, "phone"),
    ({"profile": ["not", "an", "object"]}, "profile"),
    ({"profile": {"big": "x" * 20_000}}, "profile"),
    ({"profile": {"when": object()}}, "profile"),
    ({"bio": "b" * 100_001}, "bio"),
    ({"bio": "nul\x00byte"}, "bio"),
]

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize(("override", "field"), CUSTOMER_CASES)
async def test_register_customer_refuses_bad_input(pool, db, unique, override, field):
    args: dict[str, Any] = {"email": f"{unique('ok')}@example.com", "full_name": "Ok Name"}
    args.update(override)
    before = await db.state()
    with pytest.raises(InvalidInput) as refused:
        await c.register_customer(pool, **args)
    assert refused.value.field == field
    assert await db.state() == before


PRODUCT_CASES = [
    ({"sku": "lower-case"}, "sku"),
    ({"sku": "AB"}, "sku"),
    ({"name": ""}, "name"),
    ({"category": "Not A Slug"}, "category"),
    ({"price": "-1.00"}, "price"),
    ({"price": "1.005"}, "price"),
    ({"price": "NaN"}, "price"),
    ({"price": "Infinity"}, "price"),
    ({"price": "12,50"}, "price"),
    ({"price": 12.5}, "price"),
    ({"price": Decimal("10000000000.00")}, "price"),
    ({"stock": -1}, "stock"),
    ({"stock": 2**31}, "stock"),
    ({"attributes": "color=red"}, "attributes"),
    ({"description": "d" * 100_001}, "description"),
    ({"active": "yes"}, "active"),
]


@pytest.mark.parametrize(("override", "field"), PRODUCT_CASES)
async def test_add_product_refuses_bad_input(pool, db, unique, override, field):
    args: dict[str, Any] = {
        "sku": unique("OK-").upper(),
        "name": "Teapot",
        "category": "kitchen",
        "price": "10.00",
    }
    args.update(override)
    before = await db.state()
    with pytest.raises(InvalidInput) as refused:
        await c.add_product(pool, **args)
    assert refused.value.field == field
    assert await db.state() == before


ORDER_CASES = [
    ({"items": []}, "items"),
    ({"items": "P1"}, "items"),
    ({"items": [(1,)]}, "items"),
    ({"items": [("PRODUCT", 1)]}, "product_id"),
    ({"items": [(-5, 1)]}, "product_id"),
    ({"items": [("{product}", 0)]}, "quantity"),
    ({"items": [("{product}", -2)]}, "quantity"),
    ({"items": [("{product}", 1.5)]}, "quantity"),
    ({"items": [("{product}", 1001)]}, "quantity"),
    ({"items": [("{product}", 600), ("{product}", 600)]}, "quantity"),
    ({"items": [(n, 1) for n in range(1, 52)]}, "items"),
    ({"customer_id": 0}, "customer_id"),
    ({"customer_id": True}, "customer_id"),
    ({"currency": "eur"}, "currency"),
    ({"currency": "EURO"}, "currency"),
    ({"currency": "JPY"}, "currency"),
    ({"shipping_address": {"name": "x"}}, "shipping_address"),
    ({"shipping_address": {**GOOD_ADDRESS, "country": "XX"}}, "shipping_address.country"),
    ({"shipping_address": {**GOOD_ADDRESS, "country": "France"}}, "shipping_address.country"),
    ({"shipping_address": {**GOOD_ADDRESS, "city": ""}}, "shipping_address.city"),
    ({"shipping_address": "1 Main St, Paris"}, "shipping_address"),
]


@pytest.mark.parametrize(("override", "field"), ORDER_CASES)
async def test_place_order_refuses_bad_input(pool, db, customer, make_product, override, field):
    product = await make_product()

    def fill(value: Any) -> Any:
        return product if value == "{product}" else value

    args: dict[str, Any] = {
        "customer_id": customer,
        "items": [(product, 1)],
        "shipping_address": GOOD_ADDRESS,
    }
    args.update(override)
    if isinstance(args["items"], list):
        args["items"] = [tuple(fill(x) for x in item) for item in args["items"]]
    before = await db.state()
    with pytest.raises(InvalidInput) as refused:
        await c.place_order(pool, **args)
    assert refused.value.field == field
    assert await db.state() == before


@pytest.mark.parametrize(
    ("command", "args", "field"),
    [
        (c.pay, {"order_id": "7"}, "order_id"),
        (c.pay, {"order_id": 1, "method": "cash"}, "method"),
        (c.ship, {"order_id": -1}, "order_id"),
        (c.cancel, {"order_id": 0}, "order_id"),
        (c.refund, {"order_id": None}, "order_id"),
        (c.change_price, {"product_id": 1, "price": "-0.01"}, "price"),
        (c.change_price, {"product_id": 1, "price": "abc"}, "price"),
        (c.restock, {"product_id": 1, "quantity": 0}, "quantity"),
        (c.change_profile, {"customer_id": 1}, "change_profile"),
        (c.change_profile, {"customer_id": 1, "email": "nope"}, "email"),
        (c.change_profile, {"customer_id": 1, "phone": "12"}, "phone"),
    ],
)
async def test_other_commands_refuse_bad_input(pool, db, command, args, field):
    before = await db.state()
    with pytest.raises(InvalidInput) as refused:
        await command(pool, **args)
    assert refused.value.field == field
    assert await db.state() == before


async def test_every_refusal_is_a_domain_error_with_a_message(pool):
    with pytest.raises(DomainError, match="invalid email: 'nope' is not an email address"):
        await c.register_customer(pool, "nope", "Name")
