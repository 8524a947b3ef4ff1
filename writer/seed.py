"""Bulk-load a realistic shop history with COPY: customers, products, orders.

Orders come with their items, totals computed by ``writer.pricing`` exactly as
``place_order`` computes them, a status with the timestamps that status
implies, and the payments it implies (a capture once paid; a refund when
refunded or cancelled after payment). Everything is generated from
``random.Random(seed)`` and appended after the rows already there.

Ids are reserved up front: each identity sequence is moved past the range
this seed will fill, so writers running meanwhile take ids after it, and the
rows can be generated without asking the database. A generator thread
formats batches of COPY lines while the main thread loads the previous one,
so formatting (client CPU) and loading (server CPU) overlap. Each batch
(``BATCH`` rows or orders) is one transaction, so that logical decoding
downstream sees transactions of a sane size. At the end each sequence is set
just past the largest id in its table.

Referential checks are switched off for our batches when the role may do so
(``session_replication_role = replica``, superuser only): every reference is
drawn from ids that exist or that an earlier batch loaded, so they hold by
construction (the tests check them), and per-row foreign-key triggers would
otherwise dominate the load time.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


_NULL = "\\N"  # COPY text format's NULL


Lines = list[str]
_Lines = list[tuple[str, Lines]]  # (COPY statement, its lines) per table

_COPY = {
    "customers": "COPY customers"
    " (id, email, full_name, phone, profile, bio, created_at, updated_at) FROM STDIN",
    "products": "COPY products (id, sku, name, category, price, stock, attributes,"
    " description, active, created_at, updated_at) FROM STDIN",
    "orders": "COPY orders (id, customer_id, status, currency, subtotal, tax, shipping_fee,"
    " total, shipping_address, placed_at, paid_at, shipped_at, cancelled_at, refunded_at,"
    " updated_at) FROM STDIN",
    "order_items": "COPY order_items"
    " (order_id, line_no, product_id, quantity, unit_price, line_total) FROM STDIN",
    "payments": "COPY payments"
    " (id, order_id, kind, amount, method, provider_ref, created_at) FROM STDIN",
}

_PROFILES = [
    _json({"language": language, "newsletter": newsletter, "tier": tier})
    for language in ("en", "de", "fr", "nl")
    for newsletter in (True, False, False)
    for tier in ("standard", "standard", "standard", "silver", "gold")
]


@dataclass(slots=True)
class _Catalogue:
    """What orders may refer to: existing rows plus the ones this seed adds."""

    customer_ids: list[int]
    product_ids: list[int]
    unit_prices: dict[str, list[Decimal]]  # currency -> price of product_ids[i]

    def add_product(self, product_id: int, price: Decimal) -> None:
        self.product_ids.append(product_id)
        for currency, prices in self.unit_prices.items():
            prices.append(convert(price, currency))


@dataclass(slots=True)
class _Generator:
    """State of the generator thread: the random stream and the next free ids."""

    rng: random.Random
    now: datetime
    next_id: dict[str, int]
    catalogue: _Catalogue


def _customers(g: _Generator, count: int) -> _Lines:
    """No value needs COPY escaping: see ``_orders``."""
    rng = g.rng
    random_ = rng.random
    first_id = g.next_id["customers"]
    lines: Lines = []
    for customer_id in range(first_id, first_id + count):
        first = FIRST_NAMES[int(random_() * len(FIRST_NAMES))]
        last = LAST_NAMES[int(random_() * len(LAST_NAMES))]
        created = g.now - timedelta(days=365 + random_() * 730)
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
        g.catalogue.customer_ids.append(customer_id)
    g.next_id["customers"] = first_id + count
    return [(_COPY["customers"], lines)]


def _products(g: _Generator, count: int) -> _Lines:
    rng = g.rng
    random_ = rng.random
    first_id = g.next_id["products"]
    lines: Lines = []
    for product_id in range(first_id, first_id + count):
        created = (g.now - timedelta(days=365 + random_() * 730)).isoformat()
        price = f"{rng.choice((4, 9, 14, 19, 24, 29, 39, 49, 79, 129, 249))}.{rng.choice((0, 50, 95, 99)):02d}"
        active = random_() >= 0.02
        attributes = _json(
            {
                "color": rng.choice(("red", "blue", "oak", "black")),
                "weight_g": rng.randint(50, 9000),
            }
        )
        description = text(rng, 2500, 5000) if random_() < 0.1 else text(rng, 50, 800)
        lines.append(
            f"{product_id}\tSEED-{product_id:08d}\t"
            f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {rng.choice(WORDS)}\t"
            f"{rng.choice(CATEGORIES)}\t{price}\t{rng.randint(100, 10_000)}\t{attributes}\t"
            f"{description}\t{'t' if active else 'f'}\t{created}\t{created}\n"
        )
        if active:
            g.catalogue.add_product(product_id, Decimal(price))
    g.next_id["products"] = first_id + count
    return [(_COPY["products"], lines)]


def _provider_ref(rng: random.Random, payment_id: int) -> uuid.UUID:
    """Random-looking but unique: the payment id is in the low bits (a rerun of the
    same seed must not repeat the references of the first run)."""
    return uuid.UUID(int=(rng.getrandbits(64) << 64) | payment_id, version=4)


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


def _orders(g: _Generator, count: int) -> _Lines:
    """Orders, items and payments as COPY text lines, formatted by hand for speed.

    No value needs COPY escaping: numbers, fixed words, ISO timestamps, and
    JSON made of the word lists in ``writer.plan``.
    """
    rng, now, catalogue = g.rng, g.now, g.catalogue
    order_id = g.next_id["orders"]
    payment_id = g.next_id["payments"]
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
                f"{_provider_ref(rng, payment_id)}\t{paid.isoformat()}\n"
            )
            payment_id += 1
            back = refunded or cancelled
            if back is not None:
                payments.append(
                    f"{payment_id}\t{order_id}\trefund\t{totals.total}\t{method}\t"
                    f"{_provider_ref(rng, payment_id)}\t{back.isoformat()}\n"
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

    g.next_id["orders"] = order_id
    g.next_id["payments"] = payment_id
    return [(_COPY["orders"], orders), (_COPY["order_items"], items), (_COPY["payments"], payments)]


def _batches(g: _Generator, customers: int, products: int, orders: int) -> Iterator[_Lines]:
    for total, make in ((customers, _customers), (products, _products), (orders, _orders)):
        if make is _orders and total and not (g.catalogue.customer_ids and g.catalogue.product_ids):
            raise WriterError(
                "seeding orders needs customers and active products; add some with"
                " --customers and --products"
            )
        for start in range(0, total, BATCH):
            yield make(g, min(BATCH, total - start))


def _generate(
    g: _Generator, counts: tuple[int, int, int], out: queue.Queue[Any], stop: threading.Event
) -> None:
    """The generator thread: batches into ``out``, then None (or the exception)."""

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        for batch in _batches(g, *counts):
            put(batch)
            if stop.is_set():
                return
        put(None)
    except BaseException as exc:  # handed to the loading thread, which raises it
        put(exc)


def _reserve_ids(conn: Conn, customers: int, products: int, orders: int) -> dict[str, int]:
    """The first id of each table's range; the sequences are moved past the ranges."""
    sizes = {"customers": customers, "products": products, "orders": orders,
             "payments": 2 * orders}  # fmt: skip
    first: dict[str, int] = {}
    with conn.transaction():
        conn.execute(f"LOCK TABLE {', '.join(sizes)} IN SHARE ROW EXCLUSIVE MODE")
        for table, size in sizes.items():
            row = conn.execute(
                f"SELECT greatest((SELECT coalesce(max(id), 0) FROM {table}), coalesce("
                f"pg_sequence_last_value(pg_get_serial_sequence('{table}', 'id')::regclass), 0)"
                f") + 1"
            ).fetchone()
            assert row is not None
            first[table] = int(row[0])
            conn.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, false)",
                (table, first[table] + size),
            )
    return first


def _reset_sequences(conn: Conn) -> None:
    """Each sequence just past its table's largest id (closes unused reserved ids)."""
    with conn.transaction():
        for table in ("customers", "products", "orders", "payments"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" (SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
            )


def _copy_lines(conn: Conn, statement: str, lines: Lines) -> None:
    with conn.cursor().copy(statement) as copy:
        for start in range(0, len(lines), 5000):
            copy.write("".join(lines[start : start + 5000]))


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
        row = conn.execute("SELECT current_setting('is_superuser') = 'on'").fetchone()
        superuser = bool(row and row[0])
        catalogue = _Catalogue([], [], {currency: [] for currency in CURRENCIES})
        if orders:
            catalogue.customer_ids.extend(
                r[0] for r in conn.execute("SELECT id FROM customers ORDER BY id")
            )
            for product_id, price in conn.execute(
                "SELECT id, price FROM products WHERE active ORDER BY id"
            ):
                catalogue.add_product(product_id, price)
        generator = _Generator(
            random.Random(seed),
            datetime.now(UTC).replace(microsecond=0),
            _reserve_ids(conn, customers, products, orders),
            catalogue,
        )
        batches: queue.Queue[Any] = queue.Queue(maxsize=2)
        stop = threading.Event()
        thread = threading.Thread(
            target=_generate,
            args=(generator, (customers, products, orders), batches, stop),
            name="seed-generator",
            daemon=True,
        )
        thread.start()
        try:
            while (batch := batches.get()) is not None:
                if isinstance(batch, BaseException):
                    raise batch
                with conn.transaction():
                    if superuser:
                        conn.execute("SET LOCAL session_replication_role = replica")
                    for statement, lines in batch:
                        _copy_lines(conn, statement, lines)
                for statement, lines in batch:
                    report.rows[statement.split()[1]] += len(lines)
                report.seconds = time.perf_counter() - started
                if progress:
                    progress(report)
        finally:
            stop.set()
            thread.join()
            _reset_sequences(conn)
    report.seconds = time.perf_counter() - started
    return report
