"""``python -m projections verify``: recompute every view from Postgres and compare.

What is compared (docs/projections.md, "Verifier"):

- Redis, per customer: profile, order counts by status, lifetime spend per
  currency (captures minus refunds), the recent orders (the 20 newest, with
  status and total), last activity; per order: every column, the items, net paid.
- ClickHouse: every current-state view (orders_v, order_items_v, customers_v,
  products_v, payments_v) row by row, and the aggregates (revenue per day,
  per product and per category, orders per status per day, customer lifetime
  value, the funnel per day).

At a known watermark: the verifier reads Postgres' current LSN, waits until
both projections' watermarks have reached it, then compares. Postgres may
move on meanwhile, so a difference counts only if it is still there in a
second round that waits for a newer LSN; a difference caused by a write in
flight disappears, one in the projection stays.

How ClickHouse is read: embedded chdb is locked by the worker process, so
the verifier reads it through the worker's query API (POST /analytics/sql,
read-only, paged, with API_TOKEN when set) at QUERY_API; with CLICKHOUSE_URL
naming a server it reads the server directly. Redis is read directly
(REDIS_NAMESPACE). The watermarks come from the same places: the positions
stored with Redis's views and with a ClickHouse server's tables (against the
topics' partitions in Kafka: one without a stored position counts as 0), and
embedded ClickHouse's from the /status of the worker that runs it. So the
projections may run in workers of their own (PROJECTIONS); with a ClickHouse
server the verifier needs no worker at all.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

import orjson

from cdc.lsn import format_lsn, parse_lsn
from projections.config import Settings, mask_url
from projections.positions import PositionKey, min_watermark

__all__ = ["Report", "run_verify", "verify"]

_TIMESTAMPS: Final = frozenset(
    (
        "created_at",
        "updated_at",
        "placed_at",
        "paid_at",
        "shipped_at",
        "cancelled_at",
        "refunded_at",
        "last_activity",
    )
)
_MONEY: Final = frozenset(
    ("subtotal", "tax", "shipping_fee", "total", "unit_price", "line_total", "price", "amount",
     "revenue", "paid", "refunded", "lifetime_value", "net_paid")
)  # fmt: skip
_JSON: Final = frozenset(("profile", "shipping_address", "attributes"))
_PAGE: Final = 10_000


def norm(column: str, value: Any) -> Any:
    """One comparable form for a value from Postgres, Redis or ClickHouse (by column name)."""
    if value is None:
        return None
    if column in _TIMESTAMPS:
        if not isinstance(value, datetime):
            value = datetime.fromisoformat(str(value).replace(" ", "T"))
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if column in _MONEY:
        return Decimal(str(value))
    if column in _JSON:
        return orjson.loads(value) if isinstance(value, str | bytes) else value
    if isinstance(value, bool):
        return value
    if column == "active":
        return value in (1, "1", "true", True)
    if isinstance(value, UUID | date | int | Decimal):
        return str(value)
    return value


@dataclass(slots=True)
class Check:
    name: str
    checked: int = 0
    differences: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def diff(self, key: str, what: str, truth: Any, projected: Any) -> None:
        self.keys.add(key)
        self.differences.append(f"{key}: {what}: postgres={truth!r} projection={projected!r}")


@dataclass(slots=True)
class Report:
    checks: list[Check]
    watermark: dict[str, str]
    rounds: int

    @property
    def ok(self) -> bool:
        return all(not c.differences for c in self.checks)


def _compare_rows(
    check: Check,
    key: str,
    truth: dict[str, Any],
    projected: dict[str, Any] | None,
    columns: Iterable[str],
) -> None:
    check.checked += 1
    if projected is None:
        check.diff(key, "missing", "present", None)
        return
    for col in columns:
        a, b = norm(col, truth.get(col)), norm(col, projected.get(col))
        if a != b:
            check.diff(key, col, a, b)


# ---- Postgres, the truth ------------------------------------------------------------

_PG: Final = {
    "customers": "SELECT * FROM customers ORDER BY id",
    "orders": "SELECT * FROM orders ORDER BY id",
    "order_items": "SELECT * FROM order_items ORDER BY order_id, line_no",
    "products": "SELECT * FROM products ORDER BY id",
    "payments": "SELECT * FROM payments ORDER BY id",
}


async def _postgres(dsn: str) -> tuple[int, dict[str, list[dict[str, Any]]]]:
    """Postgres' LSN and every row of the published tables, from one snapshot."""
    import psycopg
    from psycopg.rows import dict_row

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        lsn_row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        assert lsn_row is not None
        lsn = parse_lsn(lsn_row[0])
        tables: dict[str, list[dict[str, Any]]] = {}
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur = conn.cursor(row_factory=dict_row)
            for name, sql in _PG.items():
                await cur.execute(sql)
                tables[name] = await cur.fetchall()
    return lsn, tables


# ---- the projections ------------------------------------------------------------------


class _Projections:
    """Watermarks and reads of both projections (ClickHouse via the worker's API in embedded mode)."""

    def __init__(self, settings: Settings) -> None:
        import aiohttp
        import redis.asyncio as redis

        from projections.redis_views import RedisViews

        self.settings = settings
        self.redis = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=32, timeout=30
            )
        )
        self.views = RedisViews(self.redis, settings.redis_namespace)
        self.http = aiohttp.ClientSession()
        self.api = f"http://{settings.api_host}:{settings.api_port}"
        self.headers = (
            {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
        )
        self.sink: Any = None
        # each projection's partitions (from Kafka): one the store has no position for yet counts as 0
        self.partitions: dict[str, set[PositionKey]] | None = None
        self.redis_unknown = False
        if not settings.embedded_clickhouse:
            from projections.clickhouse_backend import open_backend
            from projections.clickhouse_sink import ClickHouseSink

            self.sink = ClickHouseSink(open_backend(settings.clickhouse_url))

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()

    async def watermarks(self) -> dict[str, int]:
        """Each projection's watermark, from its store's positions where the verifier reads the
        store (Redis; a ClickHouse server), so it needs no worker that runs both: the
        projections may run in workers of their own (PROJECTIONS). Embedded ClickHouse is
        locked by the worker that runs it, whose /status (at QUERY_API) says."""
        from projections.rebuild import current_namespace
        from projections.redis_views import RedisViews

        if self.partitions is None:
            self.partitions = await _partitions(self.settings)
        # the views live in the generation a rebuild switched to, if any
        namespace = await current_namespace(self.redis, self.settings.redis_namespace)
        if namespace != self.views.namespace:
            self.views = RedisViews(self.redis, namespace)
        stored = await self.views.positions()
        self.redis_unknown = not stored  # nothing under this namespace: the wrong REDIS_NAMESPACE?
        marks = {"redis": min_watermark(stored, self.partitions["redis"])}
        if self.sink is not None:
            stored = await asyncio.to_thread(self.sink.positions)
            marks["clickhouse"] = min_watermark(stored, self.partitions["clickhouse"])
        else:
            marks["clickhouse"] = await self._worker_watermark("clickhouse")
        return marks

    async def _worker_watermark(self, projection: str) -> int:
        async with self.http.get(f"{self.api}/status", headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(
                    f"the worker's /status answered {resp.status}: {(await resp.text())[:300]}"
                )
            body = await resp.json()
        if projection not in body["projections"]:
            raise RuntimeError(
                f"the worker at {self.api} does not run {projection} (it runs "
                f"{', '.join(sorted(body['projections']))}: PROJECTIONS); embedded ClickHouse "
                "(chdb) is read through the worker that runs it: point QUERY_API at that worker"
            )
        return parse_lsn(body["projections"][projection]["watermark"])

    async def clickhouse(self, sql: str) -> list[dict[str, Any]]:
        """All rows of a SELECT (paged by LIMIT/OFFSET: the API caps a page at 10 000 rows)."""
        if self.sink is not None:
            columns, rows = await asyncio.to_thread(
                self.sink.readonly_query, sql, 10_000_000, 300.0
            )
            return [dict(zip(columns, r, strict=True)) for r in rows]
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = f"{sql} LIMIT {_PAGE} OFFSET {offset}"
            async with self.http.post(
                f"{self.api}/analytics/sql",
                json={"sql": page, "max_rows": _PAGE},
                headers=self.headers,
            ) as resp:
                body = await resp.json(loads=orjson.loads)
                if resp.status != 200:
                    raise RuntimeError(
                        f"ClickHouse query through the worker failed ({resp.status}): {body}"
                    )
            out += [dict(zip(body["columns"], r, strict=True)) for r in body["rows"]]
            if len(body["rows"]) < _PAGE:
                return out
            offset += _PAGE


async def _partitions(settings: Settings) -> dict[str, set[PositionKey]]:
    """The partitions of each projection's topics, from Kafka's metadata."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        metadata = await asyncio.to_thread(admin.list_topics, timeout=10)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        raise RuntimeError(
            f"cannot read the event topics' partitions from Kafka at {settings.kafka_bootstrap} "
            f"(KAFKA_BOOTSTRAP): {error.str() if hasattr(error, 'str') else error}"
        ) from None
    found: dict[str, set[int]] = {}
    problems: list[str] = []
    for name in settings.topics:
        topic = metadata.topics.get(name)
        if topic is None:
            problems.append(f"{name} does not exist")
        elif topic.error is not None or not topic.partitions:
            problems.append(
                f"{name}: {topic.error.str() if topic.error is not None else 'no partitions'}"
            )
        else:
            found[name] = set(topic.partitions)
    if problems:
        raise RuntimeError(
            f"the event topics on {settings.kafka_bootstrap} (KAFKA_BOOTSTRAP): {'; '.join(problems)}; "
            f"cdc creates them (python -m cdc run, with TOPIC_PREFIX={settings.topic_prefix!r})"
        )
    topics = {"redis": settings.redis_topics, "clickhouse": settings.topics}
    return {name: {(t, p) for t in names for p in found[t]} for name, names in topics.items()}


async def _wait(proj: _Projections, lsn: int, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        marks = await proj.watermarks()
        if all(w >= lsn for w in marks.values()) or time.monotonic() > deadline:
            return marks
        await asyncio.sleep(0.2)


# ---- the checks ------------------------------------------------------------------------


def _group(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out


async def _check_redis(proj: _Projections, pg: dict[str, list[dict[str, Any]]]) -> list[Check]:
    users, orders = Check("redis users"), Check("redis orders")
    by_customer = _group(pg["orders"], lambda r: r["customer_id"])
    items = _group(pg["order_items"], lambda r: r["order_id"])
    payments = _group(pg["payments"], lambda r: r["order_id"])

    def net(oid: int) -> Decimal:
        return sum(
            (
                p["amount"] if p["kind"] == "capture" else -p["amount"]
                for p in payments.get(oid, ())
            ),
            Decimal(0),
        )

    async def gather(fn: Any, ids: list[str]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(ids), 32):
            out += await asyncio.gather(*(fn(x) for x in ids[i : i + 32]))
        return out

    customers = pg["customers"]
    got = await gather(proj.views.user, [str(c["id"]) for c in customers])
    for c, view in zip(customers, got, strict=True):
        key = f"user {c['id']}"
        profile_cols = [k for k in c if k != "id"]
        _compare_rows(users, key, c, None if view is None else view["profile"], profile_cols)
        if view is None:
            continue
        mine = by_customer.get(c["id"], [])
        counts: dict[str, int] = {}
        spend: dict[str, Decimal] = {}
        for o in mine:
            counts[str(o["status"])] = counts.get(str(o["status"]), 0) + 1
            amount = net(o["id"])
            if amount:
                spend[o["currency"]] = spend.get(o["currency"], Decimal(0)) + amount
        shown = {k: v for k, v in view["order_counts"].items() if v}
        if shown != counts:
            users.diff(key, "order_counts", counts, shown)
        shown_spend = {k: Decimal(v) for k, v in view["lifetime_spend"].items() if Decimal(v)}
        if shown_spend != {k: v for k, v in spend.items() if v}:
            users.diff(key, "lifetime_spend", spend, shown_spend)
        newest = sorted(mine, key=lambda o: (o["placed_at"], o["id"]), reverse=True)[:20]
        want = {str(o["id"]): (str(o["status"]), norm("total", o["total"])) for o in newest}
        have = {
            r["order_id"]: (r["status"], norm("total", r["total"])) for r in view["recent_orders"]
        }
        if want != have:
            users.diff(key, "recent_orders", want, have)
        last = max([c["updated_at"], *(o["updated_at"] for o in mine)])
        if norm("last_activity", last) != norm("last_activity", view["last_activity"]):
            users.diff(key, "last_activity", last, view["last_activity"])

    pg_orders = pg["orders"]
    got = await gather(proj.views.order, [str(o["id"]) for o in pg_orders])
    for o, view in zip(pg_orders, got, strict=True):
        key = f"order {o['id']}"
        _compare_rows(orders, key, o, view, [k for k in o if k != "id"])
        if view is None:
            continue
        want_items = [
            {k: norm(k, v) for k, v in i.items() if k != "order_id"} for i in items.get(o["id"], [])
        ]
        have_items = [{k: norm(k, v) for k, v in i.items()} for i in view["items"]]
        if want_items != have_items:
            orders.diff(key, "items", want_items, have_items)
        if norm("net_paid", net(o["id"])) != norm("net_paid", view["net_paid"]):
            orders.diff(key, "net_paid", net(o["id"]), view["net_paid"])
    return [users, orders]


_CH_TABLES: Final = {
    # view, key columns, Postgres table
    "orders_v": (("id",), "orders"),
    "order_items_v": (("order_id", "line_no"), "order_items"),
    "customers_v": (("id",), "customers"),
    "products_v": (("id",), "products"),
    "payments_v": (("id",), "payments"),
}


def _aggregates(
    pg: dict[str, list[dict[str, Any]]],
) -> dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]]:
    """Every aggregate, recomputed in Python from the Postgres rows (definitions: sql/clickhouse/0005)."""
    orders = {o["id"]: o for o in pg["orders"]}
    products = {p["id"]: p for p in pg["products"]}
    earning = {i: o for i, o in orders.items() if str(o["status"]) in ("paid", "shipped")}

    def day(ts: datetime) -> str:
        return ts.astimezone(UTC).date().isoformat()

    acc: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {
        "revenue_daily_v": {}, "orders_by_status_daily_v": {}, "customer_ltv_v": {},
        "revenue_by_product_daily_v": {}, "revenue_by_category_daily_v": {}, "funnel_daily_v": {},
    }  # fmt: skip

    def add(view: str, key: tuple[Any, ...], names: tuple[str, ...], **values: Any) -> None:
        row = acc[view].setdefault(
            key, {**dict(zip(names, key, strict=True)), **dict.fromkeys(values, 0)}
        )
        for k, v in values.items():
            row[k] = row[k] + v if not isinstance(v, set) else (row[k] or set()) | v

    for o in earning.values():
        add(
            "revenue_daily_v",
            (day(o["paid_at"]), o["currency"]),
            ("day", "currency"),
            orders=1,
            revenue=o["subtotal"],
        )
    for o in orders.values():
        add(
            "orders_by_status_daily_v",
            (day(o["placed_at"]), str(o["status"])),
            ("day", "status"),
            orders=1,
        )
        add("funnel_daily_v", (day(o["placed_at"]),), ("day",), placed=1,
            paid=int(o["paid_at"] is not None), shipped=int(o["shipped_at"] is not None))  # fmt: skip
    for p in pg["payments"]:
        owner = orders.get(p["order_id"])
        if owner is None:
            continue
        capture = p["kind"] == "capture"
        add("customer_ltv_v", (str(owner["customer_id"]), owner["currency"]), ("customer_id", "currency"),
            paid=p["amount"] if capture else 0, refunded=0 if capture else p["amount"],
            lifetime_value=p["amount"] if capture else -p["amount"])  # fmt: skip
    for i in pg["order_items"]:
        paid = earning.get(i["order_id"])
        if paid is None:
            continue
        d, cur = day(paid["paid_at"]), paid["currency"]
        product = products.get(i["product_id"])
        add("revenue_by_product_daily_v", (d, cur, str(i["product_id"])), ("day", "currency", "product_id"),
            orders={paid["id"]}, quantity=i["quantity"], revenue=i["line_total"])  # fmt: skip
        category = product["category"] if product else ""
        add("revenue_by_category_daily_v", (d, cur, category), ("day", "currency", "category"),
            orders={paid["id"]}, quantity=i["quantity"], revenue=i["line_total"])  # fmt: skip
    keys = {
        "revenue_daily_v": ("day", "currency"),
        "orders_by_status_daily_v": ("day", "status"),
        "customer_ltv_v": ("customer_id", "currency"),
        "revenue_by_product_daily_v": ("day", "currency", "product_id"),
        "revenue_by_category_daily_v": ("day", "currency", "category"),
        "funnel_daily_v": ("day",),
    }
    out = {}
    for view, rows in acc.items():
        for row in rows.values():
            if isinstance(row.get("orders"), set):
                row["orders"] = len(row["orders"])
        out[view] = (keys[view], list(rows.values()))
    return out


_AGG_COLUMNS: Final = {
    "revenue_daily_v": ("orders", "revenue"),
    "orders_by_status_daily_v": ("orders",),
    "customer_ltv_v": ("paid", "refunded", "lifetime_value"),
    "revenue_by_product_daily_v": ("orders", "quantity", "revenue"),
    "revenue_by_category_daily_v": ("orders", "quantity", "revenue"),
    "funnel_daily_v": ("placed", "paid", "shipped"),
}


async def _check_clickhouse(proj: _Projections, pg: dict[str, list[dict[str, Any]]]) -> list[Check]:
    checks: list[Check] = []
    for view, (key_cols, table) in _CH_TABLES.items():
        check = Check(f"clickhouse {view}")
        rows = await proj.clickhouse(f"SELECT * FROM {view} ORDER BY {', '.join(key_cols)}")
        have = {tuple(str(r[k]) for k in key_cols): r for r in rows}
        columns = list(rows[0]) if rows else []
        want_keys = set()
        for truth in pg[table]:
            key = tuple(str(truth[k]) for k in key_cols)
            want_keys.add(key)
            cols = columns or [c for c in truth if c in ("id",)]
            _compare_rows(
                check,
                f"{table} {'/'.join(key)}",
                truth,
                have.get(key),
                [c for c in cols if c in truth],
            )
        for extra in set(have) - want_keys:
            check.diff(f"{table} {'/'.join(extra)}", "row", None, "present (not in Postgres)")
        checks.append(check)
    for view, (key_cols, want_rows) in _aggregates(pg).items():
        check = Check(f"clickhouse {view}")
        rows = await proj.clickhouse(f"SELECT * FROM {view} ORDER BY {', '.join(key_cols)}")
        have = {tuple(str(norm(k, r[k])) for k in key_cols): r for r in rows}
        want = {tuple(str(norm(k, r[k])) for k in key_cols): r for r in want_rows}
        for key in want.keys() | have.keys():
            check.checked += 1
            a, b = want.get(key), have.get(key)
            label = f"{view} {'/'.join(key)}"
            if a is None or b is None:
                check.diff(label, "row", "present" if a else None, "present" if b else None)
                continue
            for col in _AGG_COLUMNS[view]:
                x, y = norm(col, a[col]), norm(col, b[col])
                if str(x) != str(y) and not (col in _MONEY and Decimal(str(x)) == Decimal(str(y))):
                    check.diff(label, col, x, y)
        checks.append(check)
    return checks


async def verify(settings: Settings, timeout_s: float = 60.0, rounds: int = 3) -> Report:
    """Compare; a difference counts only if it persists into a later round (see the module doc)."""
    proj = _Projections(settings)
    try:
        persistent: dict[str, set[str]] | None = None
        report = Report([], {}, 0)
        for n in range(1, rounds + 1):
            lsn, _ = await _postgres(settings.pg_dsn)
            marks = await _wait(proj, lsn, timeout_s)
            behind = {k: format_lsn(v) for k, v in marks.items() if v < lsn}
            if behind and proj.redis_unknown:
                raise TimeoutError(
                    f"Redis holds no positions under REDIS_NAMESPACE={settings.redis_namespace!r} "
                    f"({mask_url(settings.redis_url)}): is that the worker's namespace, and has the "
                    "worker applied anything yet?"
                )
            if behind:
                raise TimeoutError(
                    f"the projections did not reach Postgres' LSN {format_lsn(lsn)} within "
                    f"{timeout_s:.0f} s (watermarks: {behind}); is the worker running and cdc "
                    "publishing? (python -m projections worker, python -m cdc run)"
                )
            _, pg = await _postgres(settings.pg_dsn)
            # the snapshot may be newer than the LSN waited for: wait for it too
            lsn2, _ = await _postgres(settings.pg_dsn)
            await _wait(proj, lsn2, timeout_s)
            checks = await _check_redis(proj, pg) + await _check_clickhouse(proj, pg)
            report = Report(checks, {k: format_lsn(v) for k, v in marks.items()}, n)
            if persistent is not None:
                for check in checks:
                    keep = persistent.get(check.name, set()) & check.keys
                    check.differences = [d for d in check.differences if d.split(":", 1)[0] in keep]
                    check.keys = keep
            if report.ok:
                return report
            persistent = {c.name: set(c.keys) for c in checks}
        return report
    finally:
        await proj.close()


def run_verify(settings: Settings, *, timeout_s: float, max_report: int, json_out: bool) -> int:
    """The CLI: print the report; 0 when everything matches, 1 on differences, 2 when it could not compare."""
    try:
        report = asyncio.run(verify(settings, timeout_s))
    except Exception as exc:  # a known failure, said in one line
        print(
            f"verify: cannot compare: {exc} (Postgres {mask_url(settings.pg_dsn)})", file=sys.stderr
        )
        return 2
    if json_out:
        doc = {
            "ok": report.ok,
            "rounds": report.rounds,
            "watermark": report.watermark,
            "checks": {
                c.name: {
                    "checked": c.checked,
                    "differences": len(c.differences),
                    "first": c.differences[:max_report],
                }
                for c in report.checks
            },
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")
    else:
        for c in report.checks:
            mark = "ok " if not c.differences else "DIFF"
            print(f"{mark} {c.name}: {c.checked} checked, {len(c.differences)} differences")
            for line in c.differences[:max_report]:
                print(f"     {line}")
            if len(c.differences) > max_report:
                print(f"     ... and {len(c.differences) - max_report} more")
        print(
            f"watermarks: {report.watermark}; {'all match' if report.ok else 'differences found'}"
        )
    return 0 if report.ok else 1
