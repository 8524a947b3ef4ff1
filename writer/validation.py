"""Check and normalise command arguments before anything reaches the database.

Each function returns the value as it will be stored or raises
``InvalidInput`` naming the field. The limits mirror the CHECK constraints
in sql/postgres, which stay as the last line of defence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from writer.errors import InvalidInput

__all__ = [
    "MAX_BIO_CHARS",
    "MAX_JSON_BYTES",
    "MAX_ORDER_LINES",
    "MAX_QUANTITY",
    "PAYMENT_METHODS",
    "category",
    "email",
    "full_name",
    "json_object",
    "long_text",
    "money",
    "order_lines",
    "payment_method",
    "phone",
    "positive_id",
    "product_name",
    "quantity",
    "shipping_address",
    "sku",
    "stock",
]

MAX_EMAIL_CHARS = 254
MAX_NAME_CHARS = 200
MAX_BIO_CHARS = 100_000
MAX_JSON_BYTES = 16_384
MAX_ORDER_LINES = 50
MAX_QUANTITY = 1_000
MAX_STOCK = 2**31 - 1
MAX_MONEY = Decimal("9999999999.99")  # numeric(12,2)
MAX_ID = 2**63 - 1
PAYMENT_METHODS = frozenset({"card", "paypal", "bank_transfer", "gift_card"})
ADDRESS_FIELDS = ("name", "line1", "city", "postal_code", "country")

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE = re.compile(r"\+?[0-9][0-9 ()-]{4,30}")
_SKU = re.compile(r"[A-Z0-9][A-Z0-9-]{2,39}")
_CATEGORY = re.compile(r"[a-z][a-z0-9-]{0,63}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CENT = Decimal("0.01")


def positive_id(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(field, f"expected an integer id, got {type(value).__name__}")
    if not 0 < value <= MAX_ID:
        raise InvalidInput(field, f"expected a positive id, got {value}")
    return value


def _line(field: str, value: Any, max_chars: int) -> str:
    """A single-line, non-empty, bounded string, stripped."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"expected text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidInput(field, "must not be empty")
    if len(text) > max_chars:
        raise InvalidInput(field, f"{len(text)} characters, at most {max_chars} allowed")
    if _CONTROL.search(text):
        raise InvalidInput(field, "must not contain control characters")
    return text


def email(value: Any) -> str:
    """Stored lower-case: addresses differing only in case are the same customer."""
    text = _line("email", value, MAX_EMAIL_CHARS).lower()
    if not _EMAIL.fullmatch(text):
        raise InvalidInput("email", f"{text!r} is not an email address (expected name@domain.tld)")
    return text


def full_name(value: Any) -> str:
    return _line("full_name", value, MAX_NAME_CHARS)


def phone(value: Any) -> str | None:
    if value is None:
        return None
    text = _line("phone", value, 32)
    if not _PHONE.fullmatch(text):
        raise InvalidInput(
            "phone", f"{text!r} is not a phone number (digits, spaces, ()- and a leading +)"
        )
    return text


def json_object(field: str, value: Any, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The object encoded as JSON text, ready for a ``%s::jsonb`` parameter."""
    if not isinstance(value, Mapping):
        raise InvalidInput(field, f"expected a JSON object, got {type(value).__name__}")
    try:
        encoded = orjson.dumps(dict(value))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidInput(field, f"not representable as JSON ({exc})") from None
    if len(encoded) > max_bytes:
        raise InvalidInput(field, f"{len(encoded)} bytes of JSON, at most {max_bytes} allowed")
    if b"\\u0000" in encoded:
        raise InvalidInput(field, "must not contain NUL characters (jsonb cannot store them)")
    return encoded.decode()


def long_text(field: str, value: Any, max_chars: int = MAX_BIO_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"expected text, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInput(field, f"{len(value)} characters, at most {max_chars} allowed")
    if "\x00" in value:
        raise InvalidInput(field, "must not contain NUL characters")
    return value


def sku(value: Any) -> str:
    text = _line("sku", value, 40)
    if not _SKU.fullmatch(text):
        raise InvalidInput("sku", f"{text!r} is not a SKU (3-40 of A-Z, 0-9 and -)")
    return text


def product_name(value: Any) -> str:
    return _line("name", value, MAX_NAME_CHARS)


def category(value: Any) -> str:
    text = _line("category", value, 64)
    if not _CATEGORY.fullmatch(text):
        raise InvalidInput("category", f"{text!r} is not a category slug (a-z, 0-9 and -)")
    return text


def money(field: str, value: Any) -> Decimal:
    """A non-negative amount with at most two decimals; floats are refused (inexact)."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise InvalidInput(
            field, f"expected a Decimal, int or decimal string, got {type(value).__name__}"
        )
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise InvalidInput(field, f"{value!r} is not a number") from None
    if not amount.is_finite():
        raise InvalidInput(field, f"{value!r} is not a finite amount")
    if amount < 0:
        raise InvalidInput(field, f"{amount} is negative")
    if amount > MAX_MONEY:
        raise InvalidInput(field, f"{amount} is larger than {MAX_MONEY}")
    if amount != amount.quantize(_CENT):
        raise InvalidInput(field, f"{amount} has more than two decimals")
    return amount.quantize(_CENT)


def _integer(field: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(field, f"expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInput(field, f"{value} is outside {low}..{high}")
    return value


def stock(value: Any) -> int:
    return _integer("stock", value, 0, MAX_STOCK)


def quantity(value: Any) -> int:
    return _integer("quantity", value, 1, MAX_QUANTITY)


def order_lines(items: Any) -> list[tuple[int, int]]:
    """``[(product_id, quantity), ...]``; repeated products are merged into one line."""
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidInput("items", "expected a list of (product_id, quantity) pairs")
    merged: dict[int, int] = {}
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise InvalidInput("items", f"expected (product_id, quantity) pairs, got {item!r}")
        product_id = positive_id("product_id", item[0])
        merged[product_id] = merged.get(product_id, 0) + quantity(item[1])
    if not merged:
        raise InvalidInput("items", "an order needs at least one item")
    if len(merged) > MAX_ORDER_LINES:
        raise InvalidInput("items", f"{len(merged)} products, at most {MAX_ORDER_LINES} per order")
    for product_id, total in merged.items():
        if total > MAX_QUANTITY:
            raise InvalidInput(
                "quantity", f"{total} of product {product_id}, at most {MAX_QUANTITY} per order"
            )
    return list(merged.items())


def shipping_address(value: Any, countries: Iterable[str]) -> tuple[dict[str, str], str]:
    """The address (fields stripped) and its JSON text; the country must be one we ship to."""
    if not isinstance(value, Mapping):
        raise InvalidInput("shipping_address", f"expected an object, got {type(value).__name__}")
    address: dict[str, str] = {}
    for key in ADDRESS_FIELDS:
        if key not in value:
            raise InvalidInput(
                "shipping_address", f"missing {key!r} (needs {', '.join(ADDRESS_FIELDS)})"
            )
        address[key] = _line(f"shipping_address.{key}", value[key], MAX_NAME_CHARS)
    for key, extra in value.items():
        if key not in address:
            if not isinstance(key, str):
                raise InvalidInput("shipping_address", "keys must be text")
            address[key] = _line(f"shipping_address.{key}", extra, MAX_NAME_CHARS)
    country = address["country"] = address["country"].upper()
    if not _COUNTRY.fullmatch(country):
        raise InvalidInput("shipping_address.country", f"{country!r} is not an ISO 3166 code")
    allowed = sorted(countries)
    if country not in allowed:
        raise InvalidInput(
            "shipping_address.country", f"we do not ship to {country} (only {', '.join(allowed)})"
        )
    return address, json_object("shipping_address", address, 2048)


def payment_method(value: Any) -> str:
    if value not in PAYMENT_METHODS:
        raise InvalidInput(
            "method", f"{value!r} is not a payment method ({', '.join(sorted(PAYMENT_METHODS))})"
        )
    return str(value)
