"""The ClickHouse projection: every event into `events`, the row changes into
current-state tables, and how far it has read into `projection_positions`,
all in one apply() per batch.

The current-state rows come from the change envelopes (`changes[].after` /
`before`), not from `data`: the envelopes are lossless whatever the event
type. Each table is a ReplacingMergeTree on the event's version, so a replayed
or older change never wins over a newer one, and aggregates are computed at
query time from the deduplicated state (sql/clickhouse/, docs/clickhouse.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from operator import itemgetter
from pathlib import Path
from typing import Any, Final

from cdc.events import DomainEvent
from projections import analytics
from projections.clickhouse_backend import Backend, BackendError, QueryResult, split_statements
from projections.positions import Position, PositionKey

__all__ = ["SQL_DIR", "TABLES", "ClickHouseSink", "SinkError", "TableSpec"]

log = logging.getLogger(__name__)

SQL_DIR: Final = Path(__file__).resolve().parent.parent / "sql" / "clickhouse"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_U64: Final = 1 << 64
_BOOKKEEPING: Final = ("version", "is_deleted", "commit_lsn", "seq")


class SinkError(RuntimeError):
    """The sink cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A projected Postgres table: its columns in ClickHouse order, the key first."""

    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]  # projected columns (key included); bookkeeping is appended
    key_types: tuple[str, ...]  # ClickHouse types of the key, for lookups

    @property
    def insert_columns(self) -> tuple[str, ...]:
        return self.columns + _BOOKKEEPING


TABLES: Final[dict[str, TableSpec]] = {
    t.name: t
    for t in (
        TableSpec(
            "orders",
            ("id",),
            ("id", "customer_id", "status", "currency", "subtotal", "tax", "shipping_fee",
             "total", "shipping_address", "placed_at", "paid_at", "shipped_at", "cancelled_at",
             "refunded_at", "updated_at"),
            ("Int64",),
        ),
        TableSpec(
            "order_items",
            ("order_id", "line_no"),
            ("order_id", "line_no", "product_id", "quantity", "unit_price", "line_total"),
            ("Int64", "Int32"),
        ),
        TableSpec(
            "customers",
            ("id",),
            ("id", "email", "full_name", "phone", "profile", "created_at", "updated_at"),
            ("Int64",),
        ),
        TableSpec(
            "products",
            ("id",),
            ("id", "sku", "name", "category", "price", "stock", "attributes", "active",
             "created_at", "updated_at"),
            ("Int64",),
        ),
        TableSpec(
            "payments",
            ("id",),
            ("id", "order_id", "kind", "amount", "method", "provider_ref", "created_at"),
            ("Int64",),
        ),
    )
}  # fmt: skip

EVENT_COLUMNS: Final = (
    "event_id", "event_type", "event_version", "aggregate_type", "aggregate_id",
    "version", "commit_lsn", "occurred_at", "data", "changes",
)  # fmt: skip
TRUNCATION_COLUMNS: Final = ("table_name", "commit_lsn", "seq", "event_id")
POSITION_COLUMNS: Final = ("projection_name", "topic", "partition", "offset", "watermark")


class _Pending:
    """A row some of whose columns arrived as unchanged TOAST (absent): filled later."""

    __slots__ = ("missing", "row")

    def __init__(self, row: list[Any], missing: set[int]) -> None:
        self.row = row
        self.missing = missing


@dataclass(slots=True)
class Digest:
    """One batch turned into rows: what apply() inserts."""

    events: list[list[Any]]
    tables: dict[str, dict[tuple[Any, ...], list[Any]]]  # table -> key -> newest row
    pending: dict[str, dict[tuple[Any, ...], _Pending]]  # rows still missing TOAST columns
    truncations: list[list[Any]]


class _Route:
    """Where the changes of one projected table go (built per digest, looked up per change)."""

    __slots__ = ("getter", "index", "key_names", "nkey", "pending", "rows", "spec", "width")

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.getter = itemgetter(*spec.columns)
        self.index = {c: i for i, c in enumerate(spec.columns)}
        self.key_names = spec.key
        self.nkey = len(spec.key)
        self.width = len(spec.columns)
        self.rows: dict[tuple[Any, ...], list[Any]] = {}
        self.pending: dict[tuple[Any, ...], _Pending] = {}


def digest(events: Sequence[DomainEvent]) -> Digest:
    """Events -> rows: one per event, and the newest row per key of each projected table.

    The hot path of apply(): one dict lookup per change to route it, one
    C-level itemgetter call to cut the row out of `after`.
    """
    routes = {name: _Route(spec) for name, spec in TABLES.items()}
    event_rows: list[list[Any]] = []
    truncations: list[list[Any]] = []
    for event in events:
        version = event.version
        json_version = version if version < _U64 else str(version)
        commit_lsn = event.commit_lsn
        event_rows.append(
            [
                event.event_id,
                event.event_type,
                event.event_version,
                event.aggregate_type,
                event.aggregate_id,
                json_version,
                commit_lsn,
                event.occurred_at,
                event.data,
                event.changes,
            ]
        )
        for change in event.changes:
            source = change["source"]
            route = routes.get(source["table"])
            op = change["op"]
            if op == "t":
                truncations.append([_qualified(source), commit_lsn, source["seq"], event.event_id])
                continue
            if route is None or source["schema"] != "public":
                continue
            rows = route.rows
            if op == "d":
                image = change["before"] or change["after"] or {}
                key = tuple([image.get(k) for k in route.key_names])
                previous = rows.get(key)
                if previous is None or _version(previous) <= version:
                    row = [*key, *([None] * (route.width - route.nkey))]
                    row += (json_version, 1, commit_lsn, source["seq"])
                    rows[key] = row
                    if route.pending:
                        route.pending.pop(key, None)
                continue
            after = change["after"]
            try:
                row = list(route.getter(after))
            except KeyError:  # a column absent (unchanged TOAST, or dropped upstream)
                row = [after.get(c) for c in route.spec.columns]
            key = tuple(row[: route.nkey])
            previous = rows.get(key)
            if previous is not None and _version(previous) > version:
                continue
            row += (json_version, 0, commit_lsn, source["seq"])
            unavailable = change.get("unavailable")
            if unavailable:
                index = route.index
                missing = {index[c] for c in unavailable if c in index}
                if missing:
                    _fill_from(row, missing, previous, route.pending.get(key))
                if missing:
                    rows[key] = row
                    route.pending[key] = _Pending(row, missing)
                    continue
            rows[key] = row
            if route.pending:
                route.pending.pop(key, None)
    return Digest(
        event_rows,
        {name: r.rows for name, r in routes.items()},
        {name: r.pending for name, r in routes.items()},
        truncations,
    )


def _qualified(source: dict[str, Any]) -> str:
    schema = source.get("schema", "public")
    return source["table"] if schema == "public" else f"{schema}.{source['table']}"


def _version(row: list[Any]) -> int:
    value = row[-4]
    return value if value.__class__ is int else int(value)


def _fill_from(
    row: list[Any], missing: set[int], previous: list[Any] | None, still: _Pending | None
) -> None:
    """Take unchanged TOAST columns from the row's previous state in this batch."""
    if previous is None or previous[-3] == 1:  # no earlier row here, or a delete
        return
    unknown = still.missing if still is not None and still.row is previous else set()
    for i in list(missing):
        if i not in unknown:
            row[i] = previous[i]
            missing.discard(i)


def _batch_token(events: Sequence[DomainEvent]) -> str:
    """Deterministic insert_deduplication_token: the same batch retried is dropped by ClickHouse."""
    h = hashlib.blake2b(digest_size=16)
    for event in events:
        h.update(event.event_id.encode())
        h.update(b"\n")
    return f"{h.hexdigest()}-{len(events)}"


class ClickHouseSink:
    """Applies batches of events to ClickHouse; answers the analytics queries."""

    def __init__(
        self, backend: Backend, database: str | None = None, projection: str = "clickhouse"
    ) -> None:
        database = database or backend.database or "analytics"
        if not _IDENTIFIER.match(database):
            raise SinkError(
                f"ClickHouse database name {database!r} must be a plain identifier "
                "(letters, digits, _), e.g. analytics"
            )
        self.backend = backend
        self.database = database
        self.projection = projection
        self.toast_unresolved = 0  # rows written with a column the stream never sent

    # ---- schema

    def migrate(self) -> None:
        """Apply sql/clickhouse/*.sql in name order; every statement is idempotent."""
        files = sorted(SQL_DIR.glob("*.sql"))
        if not files:
            raise SinkError(f"no ClickHouse schema files in {SQL_DIR}; is the checkout complete?")
        for path in files:
            text = path.read_text().replace("{db}", self.database)
            for statement in split_statements(text):
                try:
                    self.backend.command(statement)
                except BackendError as exc:
                    raise SinkError(f"{path.name}: {exc}") from None

    # ---- writes

    def apply(self, events: Sequence[DomainEvent], positions: dict[PositionKey, Position]) -> None:
        """Write a batch: events, current state, truncations, then positions.

        Idempotent: a retry of the same batch carries the same deduplication
        token (ClickHouse drops the repeated blocks), and whatever gets written
        twice anyway is collapsed by ReplacingMergeTree (FINAL in the views).
        Positions go last, so they never claim more than what was written.
        """
        db = self.database
        backend = self.backend
        if events:
            batch = digest(events)
            self._resolve_toast(batch)
            token = _batch_token(events)
            # optimize_on_insert=0: rows are already one per key (digest), and
            # whatever is left (an event on several partitions) FINAL collapses.
            backend.insert(
                f"{db}.events", batch.events, EVENT_COLUMNS,
                {"insert_deduplication_token": f"{token}-events", "optimize_on_insert": 0},
            )  # fmt: skip
            for name, rows in batch.tables.items():
                if rows:
                    backend.insert(
                        f"{db}.{name}", list(rows.values()), TABLES[name].insert_columns,
                        {"insert_deduplication_token": f"{token}-{name}", "optimize_on_insert": 0},
                    )  # fmt: skip
            if batch.truncations:
                backend.insert(f"{db}.truncations", batch.truncations, TRUNCATION_COLUMNS)
        if positions:
            backend.insert(
                f"{db}.projection_positions",
                [
                    [self.projection, topic, partition, pos.offset, pos.watermark]
                    for (topic, partition), pos in positions.items()
                ],
                POSITION_COLUMNS,
            )

    def _resolve_toast(self, batch: Digest) -> None:
        """Fill columns sent as unchanged TOAST from the stored state: one query per table."""
        unresolved = 0
        for name, rows in batch.pending.items():
            if not rows:
                continue
            spec = TABLES[name]
            stored = self._current_rows(spec, list(rows))
            for key, item in rows.items():
                old = stored.get(key)
                if old is None:
                    unresolved += 1
                    continue
                for i in item.missing:
                    item.row[i] = old[i]
        if unresolved:
            self.toast_unresolved += unresolved
            log.warning(
                "%d row(s) had unchanged TOAST columns whose value is not stored yet (was the "
                "projection started after the row was written?); they were written with "
                "defaults. Rebuild the projection from a snapshot to fix them.",
                unresolved,
            )

    def _current_rows(
        self, spec: TableSpec, keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], list[Any]]:
        cols = ", ".join(spec.columns)
        # One array parameter per key column (composite keys zipped back together):
        # plain arrays bind the same way on both backends.
        params: dict[str, Any] = {f"k{i}": [k[i] for k in keys] for i in range(len(spec.key))}
        arrays = [f"{{k{i}:Array({t})}}" for i, t in enumerate(spec.key_types)]
        where = f"{spec.key[0]} IN {arrays[0]}"
        if len(spec.key) > 1:
            where += f" AND has(arrayZip({', '.join(arrays)}), ({', '.join(spec.key)}))"
        result = self.backend.query(
            f"SELECT {cols} FROM {self.database}.{spec.name} FINAL "
            f"WHERE is_deleted = 0 AND {where} "
            "SETTINGS output_format_json_quote_decimals = 1",
            params,
        )
        n = len(spec.key)
        return {tuple(r[:n]): _jsonable(r) for r in result.rows}

    # ---- progress

    def positions(self) -> dict[PositionKey, Position]:
        result = self.backend.query(
            f"SELECT topic, partition, offset, watermark FROM {self.database}.projection_positions "
            "FINAL WHERE projection_name = {p:String}",
            {"p": self.projection},
        )
        return {(t, int(p)): Position(int(o), int(w)) for t, p, o, w in result.rows}

    def watermark(self) -> int:
        """Minimum over the partitions this projection has applied (0 if none)."""
        known = self.positions()
        return min((p.watermark for p in known.values()), default=0)

    # ---- analytics

    def revenue(self, start: date, end: date, group_by: str = "day") -> list[dict[str, Any]]:
        return analytics.revenue(self.backend, self.database, start, end, group_by)

    def funnel(self, start: date | None = None, end: date | None = None) -> dict[str, Any]:
        return analytics.funnel(self.backend, self.database, start, end)

    def readonly_query(
        self,
        sql: str,
        max_rows: int = 10_000,
        timeout_s: float = 10.0,
        max_memory_bytes: int = analytics.MAX_MEMORY_BYTES,
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        result: QueryResult = analytics.readonly_query(
            self.backend, self.database, sql, max_rows, timeout_s, max_memory_bytes
        )
        return result.columns, result.rows


def _jsonable(row: tuple[Any, ...]) -> list[Any]:
    """Stored values back into the envelope encoding, to be written again."""
    out: list[Any] = []
    for value in row:
        if value is None or isinstance(value, str | int | float | bool):
            out.append(value)
        elif hasattr(value, "isoformat"):
            out.append(value.isoformat())
        else:
            out.append(str(value))
    return out
