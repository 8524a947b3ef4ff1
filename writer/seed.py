"""Bulk-load a realistic shop history with COPY: customers, products, orders.

Orders come with their items, totals computed by ``writer.pricing`` exactly as
``place_order`` computes them, a status with the timestamps that status
implies, and the payments it implies (a capture once paid; a refund when
refunded or cancelled after payment). Everything is generated from
``random.Random(seed)`` and appended after the rows already there; the
identity sequences are moved past the new ids afterwards.

Work is committed in batches (``BATCH`` orders or rows per transaction) so
that logical decoding downstream sees transactions of a sane size. While a
batch loads, the tables are locked against concurrent writers (reads go on).
Referential checks are switched off for the batch when the role may do so
(``session_replication_role = replica``, superuser only): every reference
is drawn from ids read from the database, so they hold by construction, and
the per-row foreign-key triggers would otherwise dominate the load time.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from writer.db import unavailable
from writer.errors import MigrationError, WriterError
from writer.plan import CATEGORIES, CITIES, COUNTRIES, FIRST_NAMES, LAST_NAMES, METHODS, WORDS, text
from writer.pricing import CURRENCIES, convert, order_totals

__all__ = ["BATCH", "SeedReport", "seed"]

BATCH = 50_000
TABLES = ("customers", "products", "orders", "order_items", "payments")

# (fate, weight): "cancelled_paid" is cancelled after payment, so it is refunded too
ORDER_FATES: tuple[tuple[str, int], ...] = (
    ("pending", 8),
    ("paid", 12),
    ("shipped", 58),
    ("cancelled_unpaid", 8),
    ("cancelled_paid", 5),
    ("refunded", 9),
)
CURRENCY_WEIGHTS = {"EUR": 7, "USD": 2, "GBP": 1}


@dataclass(slots=True)
class SeedReport:
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    seconds: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def rows_per_second(self) -> float:
        return self.total_rows / self.seconds if self.seconds else 0.0


Conn = psycopg.Connection[tuple[Any, ...]]


def _ts(moment: datetime) -> str:
    return moment.isoformat()


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


_NULL = "\\N"  # COPY text format's NULL


class _Batch:
    """One transaction: tables locked, FK triggers off if allowed, sequences reset at the end."""

    def __init__(self, conn: Conn, superuser: bool) -> None:
        self.conn = conn
        self.superuser = superuser

    def __enter__(self) -> Conn:
        self.conn.execute("BEGIN")
        self.conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN SHARE ROW EXCLUSIVE MODE")
        if self.superuser:
            self.conn.execute("SET LOCAL session_replication_role = replica")
        return self.conn

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.conn.execute("ROLLBACK")
            return
        for table in ("customers", "products", "orders", "payments"):
            self.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )
        self.conn.execute("COMMIT")


def _next_id(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def _customers(
    conn: Conn, rng: random.Random, count: int, now: datetime, report: SeedReport
) -> None:
    """Customers as COPY text lines (no value needs escaping: see ``_orders``)."""
    first_id = _next_id(conn, "customers")
    random_ = rng.random
    lines: list[str] = []
    for customer_id in range(first_id, first_id + count):
        first = FIRST_NAMES[int(random_() * len(FIRST_NAMES))]
        last = LAST_NAMES[int(random_() * len(LAST_NAMES))]
        created = now - timedelta(days=365 + random_() * 730)
        updated = created + timedelta(days=random_() * 300) if random_() < 0.3 else created
        bio = text(rng, 2500, 6000) if random_() < 0.02 else text(rng, 0, 200)
        profile = _PROFILES[int(random_() * len(_PROFILES))]
        phone = (
            f"+{1 + int(random_() * 49)} {100 + int(random_() * 900)} "
            f"{100000 + int(random_() * 9900000)}"
            if random_() < 0.6
            else _NULL
        )
        lines.append(
            f"{customer_id}\t{first}.{last}.{customer_id}@example.org\t"
            f"{first.title()} {last.title()}\t{phone}\t{profile}\t{bio}\t"
            f"{created.isoformat()}\t{updated.isoformat()}\n"
        )
    _copy_lines(
        conn,
        "COPY customers (id, email, full_name, phone, profile, bio, created_at, updated_at)"
        " FROM STDIN",
        lines,
    )
    report.rows["customers"] += count


_PROFILES = [
    _json({"language": language, "newsletter": newsletter, "tier": tier})
    for language in ("en", "de", "fr", "nl")
    for newsletter in (True, False, False)
    for tier in ("standard", "standard", "standard", "silver", "gold")
]


def _copy_lines(conn: Conn, statement: str, lines: list[str]) -> None:
    with conn.cursor().copy(statement) as copy:
        for start in range(0, len(lines), 5000):
            copy.write("".join(lines[start : start + 5000]))


def _products(
    conn: Conn, rng: random.Random, count: int, now: datetime, report: SeedReport
) -> None:
    first_id = _next_id(conn, "products")
    with conn.cursor().copy(
        "COPY products (id, sku, name, category, price, stock, attributes, description,"
        " active, created_at, updated_at) FROM STDIN"
    ) as copy:
        for product_id in range(first_id, first_id + count):
            created = now - timedelta(days=365 + rng.random() * 730)
            euros = rng.choice((4, 9, 14, 19, 24, 29, 39, 49, 79, 129, 249))
            copy.write_row(
                (
                    product_id,
                    f"SEED-{product_id:08d}",
                    f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {rng.choice(WORDS)}",
                    rng.choice(CATEGORIES),
                    f"{euros}.{rng.choice((0, 50, 95, 99)):02d}",
                    rng.randint(100, 10_000),
                    _json(
                        {
                            "color": rng.choice(("red", "blue", "oak", "black")),
                            "weight_g": rng.randint(50, 9000),
                        }
                    ),
                    text(rng, 2500, 5000) if rng.random() < 0.1 else text(rng, 50, 800),
                    rng.random() >= 0.02,
                    _ts(created),
                    _ts(created),
                )
            )
    report.rows["products"] += count


@dataclass(frozen=True, slots=True)
class _Catalogue:
    customer_ids: list[int]
    product_ids: list[int]
    unit_prices: dict[str, list[Decimal]]  # currency -> price of product_ids[i]


def _catalogue(conn: Conn) -> _Catalogue:
    customers = [r[0] for r in conn.execute("SELECT id FROM customers ORDER BY id").fetchall()]
    products = conn.execute("SELECT id, price FROM products WHERE active ORDER BY id").fetchall()
    return _Catalogue(
        customers,
        [product_id for product_id, _ in products],
        {cur: [convert(price, cur) for _, price in products] for cur in CURRENCIES},
    )


class _Weighted:
    """``rng.choices`` for a fixed distribution, in one ``random()`` call."""

    def __init__(self, weights: dict[Any, int]) -> None:
        self.table = [value for value, weight in weights.items() for _ in range(weight)]

    def __call__(self, rng: random.Random) -> Any:
        return self.table[int(rng.random() * len(self.table))]


_FATE = _Weighted(dict(ORDER_FATES))
_CURRENCY = _Weighted(CURRENCY_WEIGHTS)
_LINES = _Weighted({1: 4, 2: 3, 3: 2, 4: 1})
_QUANTITY = _Weighted({1: 7, 2: 2, 3: 1})


def _orders(
    conn: Conn,
    rng: random.Random,
    count: int,
    now: datetime,
    catalogue: _Catalogue,
    report: SeedReport,
) -> None:
    """Orders, items and payments as COPY text lines, formatted by hand for speed.

    No value needs COPY escaping: numbers, fixed words, ISO timestamps, and
    JSON made of the word lists in ``writer.plan``.
    """
    if not catalogue.customer_ids or not catalogue.product_ids:
        raise WriterError("seeding orders needs customers and active products; seed those first")
    order_id = _next_id(conn, "orders")
    payment_id = _next_id(conn, "payments")
    n_customers = len(catalogue.customer_ids)
    n_products = len(catalogue.product_ids)
    product_ids = catalogue.product_ids
    random_ = rng.random
    orders: list[str] = []
    items: list[str] = []
    payments: list[str] = []
    methods = list(METHODS)

    for _ in range(count):
        currency = _CURRENCY(rng)
        prices = catalogue.unit_prices[currency]
        chosen = sorted({int(n_products * random_() ** 1.5) for _ in range(_LINES(rng))})
        line_totals = []
        for line_no, index in enumerate(chosen, start=1):
            quantity = _QUANTITY(rng)
            unit_price = prices[index]
            line_total = unit_price * quantity
            line_totals.append(line_total)
            items.append(
                f"{order_id}\t{line_no}\t{product_ids[index]}\t{quantity}\t{unit_price}\t{line_total}\n"
            )
        country = COUNTRIES[int(random_() * len(COUNTRIES))]
        totals = order_totals(line_totals, currency, country)
        address = _json(
            {
                "name": f"{rng.choice(FIRST_NAMES).title()} {rng.choice(LAST_NAMES).title()}",
                "line1": f"{1 + int(random_() * 250)} {rng.choice(WORDS).title()} Street",
                "city": CITIES[country],
                "postal_code": str(1000 + int(random_() * 99000)),
                "country": country,
            }
        )
        fate = _FATE(rng)
        placed = now - timedelta(seconds=random_() * 365 * 86400 + 7200)
        paid = shipped = cancelled = refunded = None
        status = fate
        if fate in ("paid", "shipped", "refunded", "cancelled_paid"):
            paid = placed + timedelta(seconds=30 + random_() * 3600)
        if fate == "shipped" or (fate == "refunded" and random_() < 0.9):
            assert paid is not None
            shipped = paid + timedelta(seconds=600 + random_() * 3 * 86400)
        if fate.startswith("cancelled"):
            status = "cancelled"
            cancelled = (paid or placed) + timedelta(seconds=60 + random_() * 7200)
        if fate == "refunded":
            assert paid is not None
            refunded = (shipped or paid) + timedelta(seconds=3600 + random_() * 14 * 86400)
        updated = refunded or cancelled or shipped or paid or placed
        if paid is not None:
            method = methods[int(random_() * len(methods))]
            payments.append(
                f"{payment_id}\t{order_id}\tcapture\t{totals.total}\t{method}\t"
                f"{uuid.UUID(int=rng.getrandbits(128), version=4)}\t{paid.isoformat()}\n"
            )
            payment_id += 1
            back = refunded or cancelled
            if back is not None:
                payments.append(
                    f"{payment_id}\t{order_id}\trefund\t{totals.total}\t{method}\t"
                    f"{uuid.UUID(int=rng.getrandbits(128), version=4)}\t{back.isoformat()}\n"
                )
                payment_id += 1
        customer_id = catalogue.customer_ids[int(n_customers * random_() ** 2)]
        orders.append(
            f"{order_id}\t{customer_id}\t{status}\t{currency}\t{totals.subtotal}\t"
            f"{totals.tax}\t{totals.shipping_fee}\t{totals.total}\t{address}\t"
            f"{placed.isoformat()}\t{paid.isoformat() if paid else _NULL}\t"
            f"{shipped.isoformat() if shipped else _NULL}\t"
            f"{cancelled.isoformat() if cancelled else _NULL}\t"
            f"{refunded.isoformat() if refunded else _NULL}\t{updated.isoformat()}\n"
        )
        order_id += 1

    for statement, lines in (
        (
            "COPY orders (id, customer_id, status, currency, subtotal, tax, shipping_fee, total,"
            " shipping_address, placed_at, paid_at, shipped_at, cancelled_at, refunded_at,"
            " updated_at) FROM STDIN",
            orders,
        ),
        (
            "COPY order_items (order_id, line_no, product_id, quantity, unit_price, line_total)"
            " FROM STDIN",
            items,
        ),
        (
            "COPY payments (id, order_id, kind, amount, method, provider_ref, created_at)"
            " FROM STDIN",
            payments,
        ),
    ):
        _copy_lines(conn, statement, lines)
    report.rows["orders"] += count
    report.rows["order_items"] += len(items)
    report.rows["payments"] += len(payments)


def seed(
    dsn: str,
    *,
    customers: int = 0,
    products: int = 0,
    orders: int = 0,
    seed: int = 0,
    progress: Callable[[SeedReport], None] | None = None,
) -> SeedReport:
    """Append the given numbers of rows; ``progress`` is called after every batch."""
    for name, value in (("customers", customers), ("products", products), ("orders", orders)):
        if value < 0:
            raise WriterError(f"--{name} must be 0 or more, got {value}")
    rng = random.Random(seed)
    report = SeedReport()
    started = time.perf_counter()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    with conn:
        missing = conn.execute(
            "SELECT t FROM unnest(%s::text[]) t WHERE to_regclass('public.' || t) IS NULL",
            (list(TABLES),),
        ).fetchall()
        if missing:
            raise MigrationError(
                f"tables {', '.join(r[0] for r in missing)} do not exist; run"
                " `python -m writer migrate` (or `make migrate`) first"
            )
        superuser = conn.execute("SELECT current_setting('is_superuser') = 'on'").fetchone()
        batch = _Batch(conn, bool(superuser and superuser[0]))
        now = datetime.now(UTC).replace(microsecond=0)

        def step(size: int, load: Callable[[Conn, int], None], total: int) -> None:
            done = 0
            while done < total:
                n = min(size, total - done)
                with batch:
                    load(conn, n)
                done += n
                report.seconds = time.perf_counter() - started
                if progress:
                    progress(report)

        step(BATCH, lambda c, n: _customers(c, rng, n, now, report), customers)
        step(BATCH, lambda c, n: _products(c, rng, n, now, report), products)
        if orders:
            catalogue = _catalogue(conn)
            step(BATCH, lambda c, n: _orders(c, rng, n, now, catalogue, report), orders)
    report.seconds = time.perf_counter() - started
    return report
