"""The load generator: run the command plan against the shop and measure it.

``concurrency`` workers share one connection pool; worker ``w`` runs
``writer.plan.worker_plan(seed, w)`` in order, one command at a time. With a
target rate R, worker ``w``'s k-th command is due at ``start + (k*C + w)/R``
(an open schedule: a slow command delays, it does not thin out, the ones
after it); ``rate=0`` runs as fast as the database answers.

What is deterministic: each worker's sequence of commands and their
arguments (for a seed and a worker index), and therefore, with ``commands``
given, exactly which commands run. What is not: how the workers' commands
interleave, and so which ids symbolic references resolve to at run time,
whether stock suffices, and the latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from writer import commands as c
from writer.db import Pool, connect, describe_target, open_pool
from writer.errors import DomainError, MigrationError, WriterError
from writer.latency import LatencyHistogram
from writer.plan import (
    AddProduct,
    Cancel,
    ChangePrice,
    ChangeProfile,
    Command,
    Pay,
    PlaceOrder,
    Refund,
    RegisterCustomer,
    Restock,
    Ship,
    share,
    worker_plan,
)
from writer.seed import seed as seed_shop

__all__ = [
    "LoadConfig",
    "Stats",
    "Targets",
    "ensure_catalogue",
    "run_load",
    "run_tag",
    "summary",
]

# Below these, ensure_catalogue seeds a small catalogue before a run.
MIN_CUSTOMERS = 100
MIN_PRODUCTS = 50

# A worker remembers the database ids of this many of its latest orders.
_REMEMBERED_ORDERS = 20_000


@dataclass(frozen=True, slots=True)
class LoadConfig:
    rate: float = 0.0  # commands per second over all workers; 0 = as fast as possible
    duration: float = 10.0  # seconds; 0 = until stopped (Ctrl-C)
    concurrency: int = 8
    seed: int = 1
    commands: int = 0  # stop after exactly this many commands in total; 0 = no limit


@dataclass(frozen=True, slots=True)
class Targets:
    """What symbolic references resolve to: the id ranges present at the start."""

    customers: tuple[int, int]
    products: tuple[int, int]
    run_tag: str  # makes this run's emails and SKUs unique

    def customer(self, u: float) -> int:
        lo, hi = self.customers
        return min(hi, lo + int(u * (hi - lo + 1)))

    def product(self, u: float) -> int:
        lo, hi = self.products
        return min(hi, lo + int(u * (hi - lo + 1)))


def run_tag() -> str:
    """Base-36 milliseconds: unique per run, usable in emails and SKUs."""
    n = int(time.time() * 1000)
    digits = ""
    while n:
        n, d = divmod(n, 36)
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[d] + digits
    return digits


@dataclass(slots=True)
class Stats:
    """Counts and latencies; the ``window_*`` fields restart at every display tick."""

    ok: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by command
    refusals: Counter[str] = field(default_factory=Counter)  # by error class
    skipped: Counter[str] = field(default_factory=Counter)  # order never placed
    failures: Counter[str] = field(default_factory=Counter)  # unexpected errors by class
    first_failure: dict[str, str] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    by_command: dict[str, LatencyHistogram] = field(default_factory=dict)
    window: LatencyHistogram = field(default_factory=LatencyHistogram)
    window_failures: int = 0

    def record(self, kind: str, seconds: float) -> None:
        self.latency.record(seconds)
        self.window.record(seconds)
        histogram = self.by_command.get(kind)
        if histogram is None:
            histogram = self.by_command[kind] = LatencyHistogram()
        histogram.record(seconds)

    @property
    def attempted(self) -> int:
        return self.latency.count


class _Skip(Exception):
    """The command refers to an order this worker never managed to place."""


class _Worker:
    def __init__(self, index: int, pool: Pool, targets: Targets, stats: Stats) -> None:
        self.index = index
        self.pool = pool
        self.targets = targets
        self.stats = stats
        self.orders: dict[int, int] = {}  # local order number -> orders.id

    def _order(self, local: int) -> int:
        order_id = self.orders.get(local)
        if order_id is None:
            raise _Skip
        return order_id

    async def execute(self, command: Command) -> None:
        t = self.targets
        pool = self.pool
        match command:
            case PlaceOrder():
                placed = await c.place_order(
                    pool,
                    t.customer(command.customer),
                    [(t.product(u), qty) for u, qty in command.items],
                    shipping_address=command.shipping_address,
                    currency=command.currency,
                )
                self.orders[command.local] = placed.id
                self.orders.pop(command.local - _REMEMBERED_ORDERS, None)
            case Pay():
                await c.pay(pool, self._order(command.local), method=command.method)
            case Ship():
                await c.ship(pool, self._order(command.local))
            case Cancel():
                await c.cancel(pool, self._order(command.local))
            case Refund():
                await c.refund(pool, self._order(command.local))
            case RegisterCustomer():
                await c.register_customer(
                    pool,
                    f"{command.email_local}.{t.run_tag.lower()}@example.com",
                    command.full_name,
                    phone=command.phone,
                    profile=command.profile,
                    bio=command.bio,
                )
            case ChangeProfile():
                await c.change_profile(
                    pool,
                    t.customer(command.customer),
                    full_name=command.full_name if command.full_name is not None else c.UNSET,
                    phone=command.phone if command.phone is not None else c.UNSET,
                    profile=command.profile,
                    bio=command.bio if command.bio is not None else c.UNSET,
                )
            case AddProduct():
                await c.add_product(
                    pool,
                    f"L{t.run_tag}-{command.sku_suffix}",
                    command.name,
                    command.category,
                    command.price,
                    stock=command.stock,
                    attributes=command.attributes,
                    description=command.description,
                )
            case ChangePrice():
                await c.change_price(pool, t.product(command.product), command.price)
            case Restock():
                await c.restock(pool, t.product(command.product), command.quantity)

    async def run(self, config: LoadConfig, started: float, stop: asyncio.Event) -> None:
        stats = self.stats
        limit = share(config.commands, config.concurrency, self.index) if config.commands else -1
        interval = config.concurrency / config.rate if config.rate > 0 else 0.0
        offset = self.index / config.rate if config.rate > 0 else 0.0
        for k, command in enumerate(worker_plan(config.seed, self.index)):
            if k == limit or stop.is_set():
                return
            if interval:
                delay = started + offset + k * interval - time.perf_counter()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        return
            kind = command.kind
            began = time.perf_counter()
            try:
                await self.execute(command)
            except _Skip:
                stats.skipped[kind] += 1
                continue
            except DomainError as exc:
                stats.refused[kind] += 1
                stats.refusals[type(exc).__name__] += 1
            except (psycopg.Error, OSError) as exc:
                name = type(exc).__name__
                stats.failures[name] += 1
                stats.window_failures += 1
                stats.first_failure.setdefault(name, str(exc).strip().splitlines()[0])
                await asyncio.sleep(0.05)  # do not spin against a database that is down
                continue
            else:
                stats.ok[kind] += 1
            stats.record(kind, time.perf_counter() - began)


async def _targets(pool: Pool, tag: str) -> Targets:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT min(id) FROM customers), (SELECT max(id) FROM customers),"
            " (SELECT min(id) FROM products), (SELECT max(id) FROM products)"
        )
        row = await cur.fetchone()
    assert row is not None
    c_lo, c_hi, p_lo, p_hi = row
    if c_lo is None or p_lo is None:
        raise WriterError(
            "the shop has no customers or no products; run `python -m writer seed` first"
        )
    return Targets((c_lo, c_hi), (p_lo, p_hi), tag)


async def ensure_catalogue(dsn: str, seed: int) -> tuple[int, int]:
    """Give a (nearly) empty shop a small catalogue, so that orders have something to refer to.

    Returns how many customers and products were added.
    """
    conn = await connect(dsn)
    async with conn:
        try:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM customers),"
                " (SELECT count(*) FROM products WHERE active)"
            )
        except psycopg.errors.UndefinedTable:
            raise MigrationError(
                f"the shop tables do not exist in {describe_target(dsn)}; run"
                " `python -m writer migrate` (or `make migrate`) first"
            ) from None
        row = await cur.fetchone()
    assert row is not None
    add_customers = max(0, MIN_CUSTOMERS - int(row[0]))
    add_products = max(0, MIN_PRODUCTS - int(row[1]))
    if add_customers or add_products:
        await asyncio.to_thread(
            seed_shop, dsn, customers=add_customers, products=add_products, seed=seed
        )
    return add_customers, add_products


async def run_load(
    dsn: str,
    config: LoadConfig,
    *,
    tick: Callable[[Stats, float], None] | None = None,
    tick_seconds: float = 0.5,
    tag: str | None = None,
) -> tuple[Stats, float]:
    """Run until the duration, the command count or SIGINT; the stats and the elapsed seconds.

    ``tick`` is called every ``tick_seconds`` with the stats and elapsed time
    (for the live display); it may reset the ``window_*`` fields.
    """
    pool = await open_pool(dsn, config.concurrency)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()

    def interrupt() -> None:
        """First Ctrl-C: finish the commands in flight and report. Second: give up now."""
        if stop.is_set() and current is not None:
            current.cancel()
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        targets = await _targets(pool, tag or run_tag())
        stats = Stats()
        started = time.perf_counter()
        workers = [
            asyncio.create_task(_Worker(w, pool, targets, stats).run(config, started, stop))
            for w in range(config.concurrency)
        ]
        done = asyncio.gather(*workers)
        deadline = started + config.duration if config.duration > 0 else None
        while not done.done():
            timeout = tick_seconds
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.perf_counter()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), timeout)
            if tick:
                tick(stats, time.perf_counter() - started)
            if deadline is not None and time.perf_counter() >= deadline:
                stop.set()
        await done
        return stats, time.perf_counter() - started
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        await pool.close()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(stats: Stats, elapsed: float, config: LoadConfig) -> dict[str, Any]:
    """The run as JSON-ready data (what ``--json`` prints and the benchmark records)."""
    kinds = sorted(set(stats.ok) | set(stats.refused) | set(stats.skipped))
    return {
        "seed": config.seed,
        "concurrency": config.concurrency,
        "target_rate": config.rate,
        "elapsed_s": round(elapsed, 3),
        "commands": stats.attempted,
        "rate": round(stats.attempted / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "p50": _ms(stats.latency.percentile(50)),
            "p90": _ms(stats.latency.percentile(90)),
            "p99": _ms(stats.latency.percentile(99)),
            "max": _ms(stats.latency.max),
            "mean": _ms(stats.latency.mean()),
        },
        "ok": sum(stats.ok.values()),
        "refused": sum(stats.refused.values()),
        "domain_errors": dict(stats.refusals.most_common()),
        "skipped": sum(stats.skipped.values()),
        "failures": dict(stats.failures.most_common()),
        "first_failure": stats.first_failure,
        "per_command": {
            kind: {
                "ok": stats.ok[kind],
                "refused": stats.refused[kind],
                "skipped": stats.skipped[kind],
                "p50_ms": _ms(stats.by_command[kind].percentile(50))
                if kind in stats.by_command
                else 0.0,
                "p99_ms": _ms(stats.by_command[kind].percentile(99))
                if kind in stats.by_command
                else 0.0,
            }
            for kind in kinds
        },
    }
