"""Bulk load of a rebuild's new generation from one consistent Postgres snapshot.

``rebuild --source snapshot`` fills the new generation straight from the
shop's tables instead of one domain event per row through Kafka:

1. The topics' end offsets are read first: the catch-up starts there.
2. A temporary logical replication slot is created with an exported snapshot
   (``CREATE_REPLICATION_SLOT ... TEMPORARY ... EXPORT_SNAPSHOT``): the
   snapshot holds every transaction committed before the slot's consistent
   point and none after. The slot goes when its connection closes.
3. Every projected table is read inside that snapshot, in primary-key chunks,
   by the capture's own snapshot reader (cdc/snapshot.py: the same text
   output functions and value conversions as the stream, so a bulk-loaded row
   and a streamed one carry identical values).
4. Each row is written as the read of that snapshot would be: row version
   ``(consistent point << 16) | 0``, the version the capture gives snapshot
   reads. ClickHouse gets plain inserts into the new tables; Redis gets the
   final hashes, sets and sorted sets of the views (docs/redis-views.md),
   written with pipelined plain commands, with the derived fields (``@paid``,
   ``@link``, a customer's counts, spend, recent orders and last activity)
   computed here, as apply.lua would have left them after applying the reads.
5. The new generation then consumes the topics from the offsets of step 1 like
   any rebuild. Every transaction committed after the consistent point is at
   or after those offsets (it was published after they were read), and its
   version is higher than the snapshot's, so it applies; the ones committed
   before it are older than the snapshot's rows, so the version guards refuse
   them. The result is the state of the tables at the consistent point plus
   every change since: the same as the reads of an incremental snapshot, with
   none of them through Kafka, and the live projections never see them.

The ClickHouse ``events`` table is history: a snapshot has none to rebuild
it from, so the rebuild keeps the live one (see rebuild.py).
"""

from __future__ import annotations

import heapq
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import hiredis
import orjson
import psycopg
from psycopg import sql

from cdc.changes import RowChange
from cdc.config import TEXT_OPTIONS
from cdc.events import SNAPSHOT_K
from cdc.lsn import format_lsn, parse_lsn
from cdc.slot import table_infos
from cdc.snapshot import SnapshotReader
from projections.clickhouse_sink import TABLES as CLICKHOUSE_TABLES
from projections.redis_views import RECENT, _cents, _id, _micros

__all__ = [
    "READ_ORDER",
    "ClickHouseLoad",
    "PostgresSnapshot",
    "RedisLoad",
    "SnapshotError",
    "tables_for",
]

READ_ORDER: Final = ("payments", "order_items", "orders", "customers", "products")
# The Redis views are loaded in two parts, by two processes at once: "rows" takes
# the payments, items and customers rows and the orders after a split key,
# "orders" the orders up to it (orders cost the most to read and write: the
# split key leaves 20 % of them to "rows", SPLIT, which balances the two parts). Each writes fields of its own or commutes: a
# customer's counts and spend are HINCRBY, its recent orders ZADD (trimmed to
# RECENT once both are done: trim_recent), its last activity ZADD GT; an
# order's net paid is summed by Postgres (Session.net_paid).
REDIS_PARTS: Final = {
    "rows": ("payments", "order_items", "customers", "orders"),
    "orders": ("orders",),
}
SPLIT: Final = 0.8
_TABLES: Final = {
    "redis": frozenset(("payments", "order_items", "orders", "customers")),
    "clickhouse": frozenset(CLICKHOUSE_TABLES),
}
_SEND_COMMANDS: Final = 20_000  # Redis commands written at once (finish() has ~500k)
_BLOCK_BYTES: Final = 16 << 20  # COPY text handed to ClickHouse at a time
# hiredis' own stub types the command as a 1-tuple
pack_command: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class SnapshotError(RuntimeError):
    """The snapshot cannot be taken or read; the message says why and what to do."""


def tables_for(projections: list[str]) -> list[str]:
    """The tables the bulk load reads for these projections, in READ_ORDER."""
    wanted = frozenset().union(*(_TABLES[p] for p in projections))
    return [t for t in READ_ORDER if t in wanted]


def snapshot_version(lsn: int) -> int:
    """The version of every row read at a snapshot's consistent point (as the capture's reads)."""
    return (lsn << 16) | SNAPSHOT_K


class PostgresSnapshot:
    """One consistent point of the shop's tables: a temporary slot's exported snapshot.

    ``open()`` creates the slot and returns its consistent point; the snapshot can
    be read (``Session``, in this process or another) until ``close()`` drops the
    slot. Its connection must stay idle meanwhile (Postgres keeps an exported
    snapshot only that long).
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.lsn = 0
        self.name = ""
        self._repl: psycopg.Connection[Any] | None = None

    def open(self) -> int:
        slot = f"readside_rebuild_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            self._repl = psycopg.connect(
                self.dsn, replication="database", autocommit=True, connect_timeout=10
            )
            row = self._repl.execute(
                f'CREATE_REPLICATION_SLOT "{slot}" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT'
            ).fetchone()
        except psycopg.Error as exc:
            self.close()
            raise SnapshotError(
                f"cannot take a consistent snapshot of Postgres for the rebuild (a temporary "
                f"replication slot with an exported snapshot): {str(exc).strip()}; it needs "
                "wal_level=logical, a free replication slot (max_replication_slots) and the "
                "REPLICATION privilege"
            ) from None
        assert row is not None
        self.lsn, self.name = parse_lsn(str(row[1])), str(row[2])
        return self.lsn

    def close(self) -> None:
        if self._repl is not None:
            self._repl.close()  # drops the temporary slot
            self._repl = None

    @property
    def label(self) -> str:
        return format_lsn(self.lsn)


class Session:
    """One connection reading inside an exported snapshot (`name`, taken at `lsn`)."""

    def __init__(
        self, dsn: str, name: str, lsn: int, tables: list[str], chunk: int = 10_000
    ) -> None:
        conn = psycopg.connect(dsn, connect_timeout=10, options=TEXT_OPTIONS)
        try:
            found = {t.name: t for t in table_infos(conn, "public", tuple(tables))}
            self.tables = {t: found[t] for t in tables if t in found}  # in the order asked
            # table -> column -> its type, as format_type() names it
            self.columns: dict[str, dict[str, str]] = {
                t: dict(conn.execute(
                    "select attname, format_type(atttypid, atttypmod) from pg_attribute"
                    " where attrelid = %s::regclass and attnum > 0 and not attisdropped",
                    (f'"{info.schema}"."{info.name}"',),
                ).fetchall())
                for t, info in self.tables.items()
            }  # fmt: skip
            conn.rollback()  # SET TRANSACTION SNAPSHOT must open the reader's transaction
            self.reader = SnapshotReader(
                conn, name, lsn, int(time.time() * 1000), chunk, kind="rebuild"
            )
        except psycopg.Error as exc:
            conn.close()
            raise SnapshotError(f"cannot read the snapshot {name}: {str(exc).strip()}") from None
        except BaseException:
            conn.close()
            raise

    def net_paid(self, after: str | None = None, until: str | None = None) -> dict[str, int]:
        """Order id -> its payments' sum in cents, captures minus refunds (what the Redis
        views keep in an order's ``@paid``), summed by Postgres inside the snapshot; for
        the orders after `after` and up to `until` when given."""
        found = table_infos(self.reader.conn, "public", ("payments",))
        if not found:
            return {}
        info = found[0]
        bounds: list[sql.Composable] = []
        params: list[str] = []
        if after is not None:
            bounds.append(sql.SQL(" AND order_id > %s"))
            params.append(after)
        if until is not None:
            bounds.append(sql.SQL(" AND order_id <= %s"))
            params.append(until)
        rows = self.reader.conn.execute(
            sql.SQL(
                "SELECT order_id::text, sum(CASE WHEN kind = 'refund' THEN -amount ELSE amount END)::text"
                " FROM {} WHERE order_id IS NOT NULL{} GROUP BY order_id"
            ).format(sql.Identifier(info.schema, info.name), sql.Composed(bounds)),
            params,
        ).fetchall()
        return {str(oid): _cents(str(total)) for oid, total in rows}

    def estimate(self) -> int:
        """Rows the tables hold (the planner's estimate): a progress bar's total."""
        return sum(self.reader.count(t) for t in self.tables.values())

    def read(
        self, table: str, after: list[str] | None = None, until: list[str] | None = None
    ) -> Iterator[list[RowChange]]:
        """The table's rows as ``op=r`` row changes, in key order, in chunks; keys after
        `after` and up to `until` when given."""
        if table in self.tables:
            yield from self.reader.chunks(self.tables[table], after, until_key=until)

    def split_key(self, table: str, fraction: float) -> str | None:
        """The key (a one-column key, as text) below which `fraction` of the table's rows lie."""
        info = self.tables.get(table)
        if info is None or len(info.key) != 1:
            return None
        row = self.reader.conn.execute(
            sql.SQL("SELECT (percentile_disc(%s) WITHIN GROUP (ORDER BY {}))::text FROM {}").format(
                sql.Identifier(info.key[0]), sql.Identifier(info.schema, info.name)
            ),
            (fraction,),
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def copy(self, table: str, columns: tuple[str, ...], tail: tuple[int, ...]) -> Iterator[bytes]:
        """The table's `columns` then the constants `tail`, in Postgres' COPY text format
        (ClickHouse's TabSeparated: same escapes, NULL as \\N), in blocks of whole rows.
        A boolean goes as 0/1; a column the table lacks as NULL."""
        if table not in self.tables:
            return
        have = self.columns[table]
        exprs = [
            sql.SQL("NULL") if c not in have
            else sql.SQL("{}::int").format(sql.Identifier(c)) if have[c] == "boolean"
            else sql.Identifier(c)
            for c in columns
        ] + [sql.Literal(v) for v in tail]  # fmt: skip
        info = self.tables[table]
        query = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
            sql.SQL(", ").join(exprs), sql.Identifier(info.schema, info.name)
        )
        with self.reader.conn.cursor() as cur, cur.copy(query) as copy:
            block: list[bytes] = []
            size = 0
            for row in copy:  # one row per item, newline included
                block.append(bytes(row))
                size += len(row)
                if size >= _BLOCK_BYTES:
                    yield b"".join(block)
                    block, size = [], 0
            if block:
                yield b"".join(block)

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.reader.conn.close()


class ClickHouseLoad:
    """A snapshot's tables -> the new generation's current-state tables, as
    Postgres' COPY text straight into ClickHouse (no value handled in Python)."""

    def __init__(self, sink: Any, lsn: int) -> None:
        self.sink = sink
        self.tail = (snapshot_version(lsn), 0, lsn, 0)  # version, is_deleted, commit_lsn, seq

    def blocks(self, session: Session, table: str) -> Iterator[bytes]:
        spec = CLICKHOUSE_TABLES[table]
        return session.copy(table, spec.columns, self.tail)

    def insert(self, table: str, block: bytes) -> None:
        spec = CLICKHOUSE_TABLES[table]
        self.sink.backend.insert_raw(
            f"{self.sink.database}.{table}", spec.insert_columns, "TabSeparated", block,
            # one parsing thread: the blocks are small, the cores busy (3 of 13 CPU-seconds saved)
            {"optimize_on_insert": 0, "date_time_input_format": "best_effort", "input_format_parallel_parsing": 0},
        )  # fmt: skip


@dataclass(slots=True)
class _Customer:
    """What a customer's orders add up to (apply.lua's relinked(), summed)."""

    counts: dict[str, int] = field(default_factory=dict)
    spend: dict[str, int] = field(default_factory=dict)
    recent: list[tuple[int, str]] = field(default_factory=list)  # min-heap of the newest RECENT
    act: int = -1


def _member(oid: str) -> str:
    """apply.lua's member(): numeric ids zero-padded to 20 digits."""
    return oid.zfill(20) if len(oid) < 20 and oid.isdigit() else oid


class RedisLoad:
    """Rows of a snapshot -> the Redis views of a new (empty) namespace.

    Writes what apply.lua leaves after applying every row as a read of the
    snapshot, with plain pipelined commands (no script): one HSET per order
    and per customer, the items and payments of a chunk grouped per order.
    """

    def __init__(self, client: Any, namespace: str, lsn: int) -> None:
        self.client = client  # a synchronous redis.Redis: this runs in a thread of its own
        self.ns = namespace
        self.rv = f"{snapshot_version(lsn):025d}{0:010d}"
        self.paid: dict[str, int] = {}  # order id -> net payments in cents (Session.net_paid)
        self.customers: dict[str, _Customer] = {}
        self.commands = 0
        self._conn: Any = None
        self._unread = 0

    def load(self, table: str, changes: list[RowChange]) -> None:
        pipe: list[bytes] = []
        if table == "payments":
            self._payments(pipe, changes)
        elif table == "order_items":
            self._items(pipe, changes)
        elif table == "orders":
            self._orders(pipe, changes)
        elif table == "customers":
            self._customers(pipe, changes)
        else:
            return
        self._send(pipe)

    def _send(self, commands: list[bytes]) -> None:
        """Commands packed by hiredis and written at once; their replies are read at the
        next send, so Redis executes one chunk while this thread builds the next (a
        redis-py pipeline costs several µs of Python per command)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self.client.connection_pool.make_connection()
        for i in range(0, len(commands), _SEND_COMMANDS):
            self._replies()
            part = commands[i : i + _SEND_COMMANDS]
            conn.send_packed_command([b"".join(part)], check_health=False)
            self._unread = len(part)
            self.commands += len(part)
        if not commands:
            self._replies()

    def _replies(self) -> None:
        while self._unread:
            self._unread -= 1
            self._conn.read_response()  # raises the first error reply

    def close(self) -> None:
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None

    def _children(self, pipe: list[bytes], groups: dict[str, list[str]]) -> None:
        ns = self.ns
        for oid, fields in groups.items():
            pipe.append(pack_command(("HSET", f"{ns}:order:{oid}", *fields)))
        if groups:
            pipe.append(pack_command(("SADD", f"{ns}:orders", *groups)))

    def _payments(self, pipe: list[bytes], changes: list[RowChange]) -> None:
        rv = self.rv
        groups: dict[str, list[str]] = {}
        for change in changes:
            row = change.after or {}
            oid, pid = row.get("order_id"), row.get("id")
            if oid is None or pid is None:
                continue
            oid = _id(oid)
            cents = _cents(row.get("amount", "0"))
            if row.get("kind") == "refund":
                cents = -cents
            groups.setdefault(oid, []).extend((f"p:{_id(pid)}", f"{rv}|{cents}"))
        self._children(pipe, groups)

    def _items(self, pipe: list[bytes], changes: list[RowChange]) -> None:
        rv, dumps = self.rv, orjson.dumps
        groups: dict[str, list[str]] = {}
        for change in changes:
            row = change.after or {}
            oid, line = row.get("order_id"), row.get("line_no")
            if oid is None or line is None:
                continue
            oid = _id(oid)
            item = {k: v for k, v in row.items() if k != "order_id"}
            groups.setdefault(oid, []).extend((f"i:{_id(line)}", f"{rv}|{dumps(item).decode()}"))
        self._children(pipe, groups)

    def _orders(self, pipe: list[bytes], changes: list[RowChange]) -> None:
        ns, rv, dumps, paid, customers = self.ns, self.rv, orjson.dumps, self.paid, self.customers
        ids: list[str] = []
        for change in changes:
            row = change.after or {}
            if row.get("id") is None:
                continue
            oid = _id(row["id"])
            ids.append(oid)
            cust, status, currency = row.get("customer_id"), row.get("status"), row.get("currency")
            cust = "" if cust is None else _id(cust)
            status = "" if status is None else _id(status)
            currency = "" if currency is None else _id(currency)
            placed = _micros(row.get("placed_at"))
            fields = ["HSET", f"{ns}:order:{oid}", "@v", rv, "@row", dumps(row).decode()]
            if cust:
                fields += ("@c", cust)
            if status:
                fields += ("@s", status)
            if currency:
                fields += ("@cur", currency)
            if placed:
                fields += ("@ts", placed)
            cents = paid.get(oid)
            if cents is not None:
                fields += ("@paid", str(cents))
            if cust:
                view = customers.get(cust)
                if view is None:
                    view = customers[cust] = _Customer()
                act = _micros(row.get("updated_at"))
                if act and int(act) > view.act:
                    view.act = int(act)
                if status:
                    fields += ("@link", f"{cust}|{status}|{currency}|{cents or 0}")
                    view.counts[status] = view.counts.get(status, 0) + 1
                    if cents:
                        view.spend[currency] = view.spend.get(currency, 0) + cents
                    entry = (int(placed or 0), _member(oid))
                    if len(view.recent) < RECENT:
                        heapq.heappush(view.recent, entry)
                    elif entry > view.recent[0]:
                        heapq.heapreplace(view.recent, entry)
            pipe.append(pack_command(tuple(fields)))
        if ids:
            pipe.append(pack_command(("SADD", f"{ns}:orders", *ids)))

    def _customers(self, pipe: list[bytes], changes: list[RowChange]) -> None:
        rv, dumps = self.rv, orjson.dumps
        ids: list[str] = []
        for change in changes:
            row = change.after or {}
            if row.get("id") is None:
                continue
            cid = _id(row["id"])
            ids.append(cid)
            # the customer's own row; what its orders add up to is written by the
            # orders' part (finish): other fields of the same hash, and ZADD GT keeps
            # the newer of the two activities
            view = _Customer()
            act = _micros(row.get("updated_at"))
            if act:
                view.act = int(act)
            self._customer_view(pipe, cid, view, ["@v", rv, "@row", dumps(row).decode()])
        if ids:
            pipe.append(pack_command(("SADD", f"{self.ns}:users", *ids)))

    def _customer_view(
        self, pipe: list[bytes], cid: str, view: _Customer, fields: list[str]
    ) -> None:
        ns = self.ns
        key = f"{ns}:user:{cid}"
        if fields:
            pipe.append(pack_command(("HSET", key, *fields)))
        # sums over orders that two processes load: added, not set
        for status, n in view.counts.items():
            pipe.append(pack_command(("HINCRBY", key, f"@n:{status}", n)))
        for currency, cents in view.spend.items():
            pipe.append(pack_command(("HINCRBY", key, f"@spend:{currency}", cents)))
        if view.recent:
            args: list[Any] = []
            for score, member in view.recent:
                args += (score, member)
            pipe.append(pack_command(("ZADD", f"{ns}:user:{cid}:recent", *args)))
        if view.act >= 0:
            pipe.append(pack_command(("ZADD", f"{ns}:last", "GT", view.act, cid)))

    def finish(self) -> None:
        """What the orders add up to, per customer: counts, spend, recent orders, last activity."""
        pipe: list[bytes] = []
        ids = list(self.customers)
        for cid, view in self.customers.items():
            self._customer_view(pipe, cid, view, [])
        if ids:
            pipe.append(pack_command(("SADD", f"{self.ns}:users", *ids)))
        self.customers = {}
        self.paid = {}
        self._send(pipe)
        self._replies()


def load_redis(
    dsn: str,
    redis_url: str,
    snapshot: str,
    lsn: int,
    namespace: str,
    part: str,
    split: str | None,
    progress: Callable[[dict[str, Any]], None],
) -> int:
    """Read the tables of one part of the Redis views (REDIS_PARTS) inside `snapshot` and
    write them into `namespace`; returns the rows loaded. `split`: the orders key
    between the parts (None: the "orders" part takes every order). `progress` gets
    {"total": estimate} first, then {"rows": n} as it goes."""
    import redis

    session = Session(dsn, snapshot, lsn, list(REDIS_PARTS[part]))
    client = redis.Redis.from_url(redis_url)
    load = RedisLoad(client, namespace, lsn)
    try:
        progress({"total": session.estimate() if part == "rows" else 0})
        rows = 0
        for table in session.tables:
            after: list[str] | None = None
            until: list[str] | None = None
            if table == "orders" and part == "rows":  # the orders after the split
                if split is None:
                    continue
                after = [split]
            elif table == "orders" and split is not None:  # the orders up to it
                until = [split]
            if table == "orders":
                load.paid = session.net_paid(
                    after[0] if after else None, until[0] if until else None
                )
            for chunk in session.read(table, after, until):
                load.load(table, chunk)
                rows += len(chunk)
                progress({"rows": rows})
        load.finish()
        return rows
    finally:
        load.close()
        client.close()
        session.close()


def trim_recent(client: Any, namespace: str) -> None:
    """Cut every customer's recent orders to the newest RECENT, once both parts are done
    (each added the recent orders of its own share of the orders)."""
    batch: list[Any] = []
    for cid in client.sscan_iter(f"{namespace}:users", count=5000):
        batch.append(cid.decode() if isinstance(cid, bytes) else cid)
        if len(batch) >= 5000:
            _trim(client, namespace, batch)
            batch = []
    _trim(client, namespace, batch)


def _trim(client: Any, namespace: str, ids: list[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for cid in ids:
        pipe.zremrangebyrank(f"{namespace}:user:{cid}:recent", 0, -(RECENT + 1))
    pipe.execute()


def main(argv: list[str] | None = None) -> int:
    """``python -m projections.bulk_load redis --part P --snapshot S --lsn X/Y --namespace NS``:
    one part of the Redis side of a rebuild's bulk load, run by the worker in a process
    of its own (an interpreter lock of its own: the worker keeps serving and applying
    meanwhile, and the two parts run at once). Settings
    come from the environment (PG_DSN, REDIS_URL); progress goes to stdout as JSON
    lines, an error to stderr with exit code 1."""
    import argparse
    import sys

    from projections.config import Settings

    parser = argparse.ArgumentParser(prog="python -m projections.bulk_load")
    parser.add_argument("projection", choices=["redis"])
    parser.add_argument(
        "--part", required=True, choices=sorted(REDIS_PARTS), help="which tables (see REDIS_PARTS)"
    )
    parser.add_argument("--split", default=None, help="the orders key between the parts")
    parser.add_argument("--snapshot", required=True, help="the exported snapshot's name")
    parser.add_argument("--lsn", required=True, help="its consistent point, e.g. 3/86665598")
    parser.add_argument("--namespace", required=True, help="the new generation's Redis namespace")
    args = parser.parse_args(argv)

    def progress(message: dict[str, Any]) -> None:
        sys.stdout.write(orjson.dumps(message).decode() + "\n")
        sys.stdout.flush()

    try:
        settings = Settings.from_env()
        rows = load_redis(
            settings.pg_dsn,
            settings.redis_url,
            args.snapshot,
            parse_lsn(args.lsn),
            args.namespace,
            args.part,
            args.split,
            progress,
        )
    except Exception as exc:  # the worker reports it: the rebuild fails, the live generation stays
        sys.stderr.write(
            f"bulk load ({args.part}) into Redis namespace {args.namespace} failed: "
            f"{type(exc).__name__}: {exc}\n"
        )
        return 1
    progress({"rows": rows, "done": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
