"""The ClickHouse backends: URLs, SQL splitting, secrets, and the server backend.

Server tests run only when CLICKHOUSE_URL names a server (http:// or https://).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from cdc.changes import RowChange
from cdc.mapping import map_transaction
from projections.analytics import AnalyticsError
from projections.clickhouse_backend import (
    Backend,
    BackendError,
    open_backend,
    split_statements,
)
from projections.clickhouse_sink import ClickHouseSink
from projections.positions import Position

CLICKHOUSE_URL = os.environ.get("CLICKHOUSE_URL", "")


# ---- URLs and errors ----------------------------------------------------------------


def test_unknown_scheme_is_named_without_the_password() -> None:
    with pytest.raises(BackendError, match="unknown scheme") as info:
        open_backend("postgres://analyst:s3cret@db:5432/x")
    assert "s3cret" not in str(info.value)


def test_relative_chdb_path_is_refused() -> None:
    with pytest.raises(BackendError, match="absolute"):
        open_backend("chdb://relative/dir")


def test_unreachable_server_error_hides_the_password() -> None:
    with pytest.raises(BackendError, match="cannot connect") as info:
        open_backend("http://analyst:s3cret-pw@127.0.0.1:1/analytics")
    assert "s3cret-pw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)


def test_a_second_chdb_directory_in_one_process_is_refused_clearly(
    chdb_backend: Backend, tmp_path: Path
) -> None:
    with pytest.raises(BackendError, match="Only one process may open a data directory"):
        open_backend(f"chdb://{tmp_path}")
    assert chdb_backend.query("SELECT 1").rows == [(1,)]


# ---- SQL splitting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "statements"),
    [
        ("SELECT 1", ["SELECT 1"]),
        ("SELECT 1;", ["SELECT 1"]),
        ("SELECT 1; SELECT 2", ["SELECT 1", "SELECT 2"]),
        ("SELECT ';' AS s", ["SELECT ';' AS s"]),
        ("SELECT 'it''s;' AS s", ["SELECT 'it''s;' AS s"]),
        (r"SELECT 'a\';' AS s", [r"SELECT 'a\';' AS s"]),
        ('SELECT 1 AS "a;b"', ['SELECT 1 AS "a;b"']),
        ("SELECT 1 AS `a;b`", ["SELECT 1 AS `a;b`"]),
        ("SELECT $$;$$", ["SELECT $$;$$"]),
        ("SELECT $t$ ; $t$", ["SELECT $t$ ; $t$"]),
        ("SELECT 1 -- ; DROP\n", ["SELECT 1"]),
        ("SELECT 1 /* ; */ + 1", ["SELECT 1   + 1"]),
        ("SELECT 4 - 2 / 1 # ;", ["SELECT 4 - 2 / 1"]),
        (
            "SELECT $$ ' $$; DROP TABLE t; SELECT ' '",
            ["SELECT $$ ' $$", "DROP TABLE t", "SELECT ' '"],
        ),
        (" ; ; ", []),
    ],
)
def test_split_statements(sql: str, statements: list[str]) -> None:
    assert split_statements(sql) == statements


def test_split_statements_refuses_an_unterminated_literal() -> None:
    with pytest.raises(BackendError, match="unterminated"):
        split_statements("SELECT 'oops; DROP TABLE t")


# ---- results ------------------------------------------------------------------------


def test_chdb_results_keep_exact_types(chdb_backend: Backend) -> None:
    result = chdb_backend.query(
        "SELECT toDecimal128('12345678901234.56', 2) AS d, bitShiftLeft(toUInt128(1), 100) AS v, "
        "toUInt64(18446744073709551615) AS u, toDateTime64('2026-03-01 10:00:00.123456', 6, 'UTC') AS t, "
        "toDate('2026-03-01') AS day, CAST(NULL AS Nullable(Decimal(12, 2))) AS n, {p:String} AS p",
        {"p": "it's; DROP"},
    )
    assert result.columns == ("d", "v", "u", "t", "day", "n", "p")
    assert result.rows == [
        (
            Decimal("12345678901234.56"),
            1 << 100,
            2**64 - 1,
            datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=UTC),
            date(2026, 3, 1),
            None,
            "it's; DROP",
        )
    ]


# ---- server backend -----------------------------------------------------------------

server = pytest.mark.skipif(
    not CLICKHOUSE_URL.startswith(("http://", "https://")),
    reason="CLICKHOUSE_URL does not name a ClickHouse server (http[s]://...); "
    "the server backend is tested only against a real server",
)


def _order_events() -> list:  # type: ignore[type-arg]
    ts = 1_772_445_600_000  # 2026-03-02T10:00:00Z
    at = "2026-03-02T10:00:00.000000Z"
    order = {"id": 1, "customer_id": 1, "status": "pending", "currency": "EUR",
             "subtotal": "20.00", "tax": "4.00", "shipping_fee": "0.00", "total": "24.00",
             "shipping_address": {}, "placed_at": at, "paid_at": None, "shipped_at": None,
             "cancelled_at": None, "refunded_at": None, "updated_at": at}  # fmt: skip
    item = {"order_id": 1, "line_no": 1, "product_id": 1, "quantity": 2, "unit_price": "10.00",
            "line_total": "20.00"}  # fmt: skip
    paid = dict(order, status="paid", paid_at=at)
    events = []
    for lsn, changes in (
        (0x1000, [("c", "orders", ("id",), order), ("c", "order_items", ("order_id", "line_no"), item)]),
        (0x2000, [("u", "orders", ("id",), paid)]),
    ):  # fmt: skip
        rows = [RowChange(op, "public", t, key, None, after, (), (), lsn - 10 + i, lsn, 1, i, ts, None)
                for i, (op, t, key, after) in enumerate(changes)]  # fmt: skip
        events += list(map_transaction(rows))
    return events


@server
def test_server_backend_runs_the_same_projection() -> None:
    backend = open_backend(CLICKHOUSE_URL)
    database = f"t_{uuid.uuid4().hex[:16]}"
    try:
        sink = ClickHouseSink(backend, database)
        sink.migrate()
        events = _order_events()
        sink.apply(events, {("shop.order.events", 0): Position(2, 0x2000)})
        sink.apply(events, {("shop.order.events", 0): Position(2, 0x2000)})
        assert sink.revenue(date(2026, 3, 2), date(2026, 3, 2), "day") == [
            {"day": date(2026, 3, 2), "currency": "EUR", "orders": 1, "revenue": Decimal("20.00")}
        ]
        assert sink.watermark() == 0x2000
        with pytest.raises(AnalyticsError):
            sink.readonly_query("DROP TABLE orders", 10, 5)
    finally:
        backend.command(f"DROP DATABASE IF EXISTS {database}")
        backend.close()


# ---- the table switch of a rebuild ----------------------------------------------------


def test_exchange_tables_swaps_every_pair_and_queries_never_see_half_of_it(
    chdb_backend: Backend, clickhouse_database: str
) -> None:
    import threading
    import time

    db = clickhouse_database
    chdb_backend.command(f"CREATE DATABASE {db}")
    chdb_backend.command(f"CREATE DATABASE {db}_new")
    for name in ("a", "b", "c"):
        for side, value in ((db, 1), (f"{db}_new", 2)):
            chdb_backend.command(f"CREATE TABLE {side}.{name} (v UInt8) ENGINE = MergeTree ORDER BY v")
            chdb_backend.command(f"INSERT INTO {side}.{name} VALUES ({value})")
    seen: set[tuple[int, ...]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            rows = chdb_backend.query(
                f"SELECT (SELECT max(v) FROM {db}.a), (SELECT max(v) FROM {db}.b), (SELECT max(v) FROM {db}.c)"
            ).rows
            seen.add(tuple(rows[0]))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        # ClickHouse swaps the pairs of one EXCHANGE one after the other: without the
        # backend's switch lock the readers see mixes such as (2, 1, 1)
        for _ in range(10):
            chdb_backend.exchange_tables([(f"{db}.{n}", f"{db}_new.{n}") for n in ("a", "b", "c")])
            time.sleep(0.01)
    finally:
        stop.set()
        for t in readers:
            t.join(10)
        chdb_backend.command(f"DROP DATABASE IF EXISTS {db}_new SYNC")
    assert chdb_backend.query(f"SELECT max(v) FROM {db}.a").rows == [(1,)]  # ten swaps: back
    assert seen <= {(1, 1, 1), (2, 2, 2)}, seen
    assert len(seen) == 2
