"""What an order costs: unit prices in the order's currency, tax, shipping, totals.

Catalogue prices are in the shop currency (EUR). All arithmetic is Decimal,
rounded half-up to the cent once per amount, so the stored totals always add
up exactly (the schema checks ``total = subtotal + tax + shipping_fee`` and
``line_total = unit_price * quantity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from writer.errors import InvalidInput

__all__ = [
    "CURRENCIES",
    "SHIPPING_COUNTRIES",
    "SHOP_CURRENCY",
    "Totals",
    "check_currency",
    "convert",
    "order_totals",
]

SHOP_CURRENCY = "EUR"

# Fixed rates, as a shop publishes them for a season: 1 EUR = rate units.
CURRENCIES: dict[str, Decimal] = {
    "EUR": Decimal("1"),
    "USD": Decimal("1.08"),
    "GBP": Decimal("0.86"),
}

# Countries we ship to and their VAT / sales-tax rate.
SHIPPING_COUNTRIES: dict[str, Decimal] = {
    "AT": Decimal("0.20"),
    "BE": Decimal("0.21"),
    "DE": Decimal("0.19"),
    "ES": Decimal("0.21"),
    "FR": Decimal("0.20"),
    "GB": Decimal("0.20"),
    "IT": Decimal("0.22"),
    "NL": Decimal("0.21"),
    "US": Decimal("0.07"),
}

SHIPPING_FEE = Decimal("4.95")  # EUR, waived from FREE_SHIPPING_FROM
FREE_SHIPPING_FROM = Decimal("50.00")  # EUR, on the subtotal before tax

_CENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Totals:
    subtotal: Decimal
    tax: Decimal
    shipping_fee: Decimal
    total: Decimal


def check_currency(value: object) -> str:
    if not isinstance(value, str) or len(value) != 3 or not value.isascii() or not value.isupper():
        raise InvalidInput("currency", f"{value!r} is not a currency code (3 upper-case letters)")
    if value not in CURRENCIES:
        raise InvalidInput(
            "currency", f"{value} is not accepted (only {', '.join(sorted(CURRENCIES))})"
        )
    return value


def convert(amount_eur: Decimal, currency: str) -> Decimal:
    """An EUR amount in ``currency``, to the cent."""
    return (amount_eur * CURRENCIES[currency]).quantize(_CENT, ROUND_HALF_UP)


def order_totals(line_totals: list[Decimal], currency: str, country: str) -> Totals:
    subtotal = sum(line_totals, Decimal("0.00"))
    tax = (subtotal * SHIPPING_COUNTRIES[country]).quantize(_CENT, ROUND_HALF_UP)
    free_from = convert(FREE_SHIPPING_FROM, currency)
    shipping_fee = Decimal("0.00") if subtotal >= free_from else convert(SHIPPING_FEE, currency)
    return Totals(subtotal, tax, shipping_fee, subtotal + tax + shipping_fee)
