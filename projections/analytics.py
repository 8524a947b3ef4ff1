"""The analytics the query API serves: revenue, the order funnel, and read-only SQL.

Every figure is read from the aggregate views of sql/clickhouse/0005 (one
definition, also what analysts query). User input reaches ClickHouse only as
bound parameters (``{name:Type}``) or, for readonly_query, as a single
statement run on a session that is read-only before the statement starts.
"""

from __future__ import annotations

from datetime import date
from typing import Any, Final

from projections.clickhouse_backend import Backend, BackendError, QueryResult, split_statements

__all__ = ["GROUP_BYS", "AnalyticsError", "funnel", "readonly_query", "revenue"]


class AnalyticsError(ValueError):
    """A request the analytics cannot answer as asked (bad parameter, refused SQL)."""


_REVENUE_SQL: Final[dict[str, str]] = {
    "day": """
        SELECT day, currency, orders, revenue
        FROM {db}.revenue_daily_v
        WHERE day BETWEEN {start:Date} AND {end:Date}
        ORDER BY day, currency""",
    "product": """
        SELECT l.product_id AS product_id, any(p.name) AS product_name,
               any(p.category) AS category, l.currency AS currency,
               uniqExact(l.order_id) AS orders, sum(l.quantity) AS quantity,
               sum(l.line_total) AS revenue
        FROM {db}.revenue_lines_v AS l
        LEFT JOIN {db}.products_v AS p ON p.id = l.product_id
        WHERE l.day BETWEEN {start:Date} AND {end:Date}
        GROUP BY product_id, currency
        ORDER BY revenue DESC, product_id, currency""",
    "category": """
        SELECT p.category AS category, l.currency AS currency,
               uniqExact(l.order_id) AS orders, sum(l.quantity) AS quantity,
               sum(l.line_total) AS revenue
        FROM {db}.revenue_lines_v AS l
        LEFT JOIN {db}.products_v AS p ON p.id = l.product_id
        WHERE l.day BETWEEN {start:Date} AND {end:Date}
        GROUP BY category, currency
        ORDER BY revenue DESC, category, currency""",
}
GROUP_BYS: Final = tuple(_REVENUE_SQL)


def revenue(
    backend: Backend, database: str, start: date, end: date, group_by: str = "day"
) -> list[dict[str, Any]]:
    """Revenue of the days start..end (both included, UTC), by day, product or category.

    Amounts are Decimal, per currency (never summed across currencies).
    """
    sql = _REVENUE_SQL.get(group_by)
    if sql is None:
        raise AnalyticsError(f"group_by={group_by!r}; expected one of {', '.join(GROUP_BYS)}")
    if start > end:
        raise AnalyticsError(f"from={start} is after to={end}; expected from <= to")
    # {db} is a checked identifier (ClickHouseSink); the dates are bound parameters.
    result = backend.query(sql.replace("{db}", database), {"start": start, "end": end})
    return result.dicts()


_FUNNEL_SQL: Final = """
    SELECT count() AS placed,
           countIf(reached_paid) AS paid,
           countIf(reached_shipped) AS shipped,
           avg(time_to_pay_s) AS pay_avg, quantileExact(0.5)(time_to_pay_s) AS pay_p50,
           quantileExact(0.9)(time_to_pay_s) AS pay_p90,
           avg(time_to_ship_s) AS ship_avg, quantileExact(0.5)(time_to_ship_s) AS ship_p50,
           quantileExact(0.9)(time_to_ship_s) AS ship_p90
    FROM {db}.order_funnel_v
    WHERE day BETWEEN {start:Date} AND {end:Date}"""


def funnel(
    backend: Backend, database: str, start: date | None = None, end: date | None = None
) -> dict[str, Any]:
    """placed -> paid -> shipped for the orders placed start..end (both included; default all).

    Times in seconds: to pay = placed -> paid, to ship = placed -> shipped,
    over the orders that reached the step (None when none did).
    """
    start = start or date(1970, 1, 1)
    end = end or date(2299, 12, 31)
    if start > end:
        raise AnalyticsError(f"from={start} is after to={end}; expected from <= to")
    result = backend.query(_FUNNEL_SQL.replace("{db}", database), {"start": start, "end": end})
    row = result.dicts()[0]
    placed, paid, shipped = int(row["placed"]), int(row["paid"]), int(row["shipped"])

    def stats(prefix: str) -> dict[str, float | None]:
        if (paid if prefix == "pay" else shipped) == 0:
            return {"avg": None, "p50": None, "p90": None}
        return {k: _float(row[f"{prefix}_{k}"]) for k in ("avg", "p50", "p90")}

    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "placed": placed,
        "paid": paid,
        "shipped": shipped,
        "paid_rate": paid / placed if placed else None,
        "shipped_rate": shipped / placed if placed else None,
        "time_to_pay_s": stats("pay"),
        "time_to_ship_s": stats("ship"),
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# ClickHouse error codes readonly_query turns into plain answers.
_REFUSALS: Final = {
    "Code: 164.": "the statement writes or changes settings; only reads are allowed",
    "Code: 159.": "the statement ran longer than {timeout} s; narrow it down (WHERE, LIMIT)",
    "Code: 396.": "the result has more than {max_rows} rows; add a LIMIT or aggregate",
    "Code: 241.": "the statement needs more than {memory} bytes of memory; narrow it down",
}
MAX_MEMORY_BYTES: Final = 2 << 30  # the worker shares its process with the engine: cap a query


def readonly_query(
    backend: Backend,
    database: str,
    sql: str,
    max_rows: int,
    timeout_s: float,
    max_memory_bytes: int = MAX_MEMORY_BYTES,
) -> QueryResult:
    """Run one analyst statement read-only, with a time, a row and a memory limit.

    The session is made read-only (readonly=1) before the statement runs, so
    nothing in the statement can write or lift the limits. Unqualified table
    names resolve in `database` (orders_v, revenue_daily_v, ...).
    """
    if max_rows < 1 or timeout_s <= 0:
        raise AnalyticsError(f"max_rows ({max_rows}) and timeout_s ({timeout_s}) must be positive")
    try:
        statements = split_statements(sql)
    except BackendError as exc:
        raise AnalyticsError(str(exc)) from None
    if len(statements) != 1:
        raise AnalyticsError(
            f"expected exactly one SQL statement, got {len(statements)}; send one query per request"
        )
    settings = {
        "max_execution_time": timeout_s,
        "timeout_overflow_mode": "throw",
        "max_result_rows": max_rows,
        "result_overflow_mode": "throw",
        "max_memory_usage": max_memory_bytes,
        "readonly": 1,
    }
    try:
        return backend.query(statements[0], None, settings, database=database)
    except BackendError as exc:
        text = str(exc)
        for code, message in _REFUSALS.items():
            if code in text:
                raise AnalyticsError(
                    message.format(timeout=timeout_s, max_rows=max_rows, memory=max_memory_bytes)
                ) from None
        raise AnalyticsError(text) from None
