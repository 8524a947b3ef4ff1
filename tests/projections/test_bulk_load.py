"""The bulk load of ``rebuild --source snapshot`` writes what the streamed path writes.

A seeded shop (real Postgres, customers with more than 20 orders each) is read
inside one exported snapshot twice:

- by the bulk load (projections/bulk_load.py): both Redis parts with the orders
  split between them, the recent lists trimmed, and ClickHouse from COPY text;
- as snapshot-read domain events (cdc's mapper, as the capture publishes them),
  applied by the sinks of the live pipeline (apply.lua, ClickHouseSink.apply).

Every Redis key must hold the same value in both namespaces, and every
ClickHouse current-state table the same rows (JSON columns compared as JSON:
their text differs, see docs/clickhouse.md).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import redis

from cdc.mapping import TransactionMapper
from projections.bulk_load import (
    REDIS_PARTS,
    SPLIT,
    ClickHouseLoad,
    PostgresSnapshot,
    Session,
    load_redis,
    tables_for,
    trim_recent,
)
from projections.clickhouse_sink import TABLES, ClickHouseSink
from projections.redis_views import RedisViews
from tests.projections.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
ADMIN_DSN = "postgresql://postgres@127.0.0.1:55432/postgres"
JSON_COLUMNS = {"profile", "attributes", "shipping_address"}


@pytest.fixture(scope="module")
def shop() -> Iterator[str]:
    """A database of its own, seeded: 12 customers, 400 orders (about 33 each)."""
    name = f"bulk_{uuid.uuid4().hex[:10]}"
    dsn = f"postgresql://postgres@127.0.0.1:55432/{name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        for args in (["migrate"], ["seed", "--customers", "12", "--products", "40", "--orders", "400", "--seed", "9"]):
            subprocess.run([sys.executable, "-m", "writer", *args, "--dsn", dsn], cwd=ROOT, check=True,
                           capture_output=True, timeout=120)  # fmt: skip
        yield dsn
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def snapshot_events(dsn: str, snapshot: PostgresSnapshot, tables: list[str]) -> list[Any]:
    """Every row of `tables` inside the snapshot, as the capture's snapshot-read events."""
    mapper = TransactionMapper()
    session = Session(dsn, snapshot.name, snapshot.lsn, tables)
    try:
        return [mapper.snapshot(change) for table in session.tables for chunk in session.read(table)
                for change in chunk]  # fmt: skip
    finally:
        session.close()


def dump(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """Every key of a namespace (the prefix cut off) with its value."""
    out: dict[str, Any] = {}
    for raw in client.scan_iter(match=f"{namespace}:*", count=1000):
        key = raw.decode()
        kind = client.type(key).decode()
        if kind == "hash":
            value: Any = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.get(key)
        out[key[len(namespace) + 1 :]] = value
    return out


async def test_the_redis_bulk_load_writes_what_the_script_writes(shop: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    bulk, streamed = f"bulk{uuid.uuid4().hex[:8]}", f"stream{uuid.uuid4().hex[:8]}"
    snapshot = PostgresSnapshot(shop)
    lsn = snapshot.open()
    try:
        session = Session(shop, snapshot.name, lsn, ["orders"])
        split = session.split_key("orders", SPLIT)
        session.close()
        assert split is not None
        loaded = sum(
            load_redis(shop, REDIS_URL, snapshot.name, lsn, bulk, part, split, lambda _: None)
            for part in REDIS_PARTS
        )
        trim_recent(client, bulk)
        events = snapshot_events(shop, snapshot, tables_for(["redis"]))
        async_client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            await RedisViews(async_client, streamed).apply(events, {})
        finally:
            await async_client.aclose()

        assert loaded == len(events)
        a, b = dump(client, bulk), dump(client, streamed)
        assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
        different = [k for k in a if a[k] != b[k]]
        assert not different, [(k, a[k], b[k]) for k in different[:3]]
        # the case the trim is for: customers with more orders than the recent list holds
        longest = max(len(v) for k, v in a.items() if k.endswith(":recent"))
        assert longest == 20, longest
    finally:
        snapshot.close()
        for namespace in (bulk, streamed):
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.unlink(*keys)
        client.close()


def test_the_clickhouse_bulk_load_writes_what_the_sink_writes(
    shop: str, chdb_backend: Any, clickhouse_database: str
) -> None:
    bulk = ClickHouseSink(chdb_backend, database=clickhouse_database)
    streamed = ClickHouseSink(chdb_backend, database=f"{clickhouse_database}_s")
    bulk.migrate()
    streamed.migrate()
    snapshot = PostgresSnapshot(shop)
    lsn = snapshot.open()
    try:
        load = ClickHouseLoad(bulk, lsn)
        session = Session(shop, snapshot.name, lsn, tables_for(["clickhouse"]))
        try:
            for table in session.tables:
                for block in load.blocks(session, table):
                    load.insert(table, block)
        finally:
            session.close()
        streamed.apply(snapshot_events(shop, snapshot, tables_for(["clickhouse"])), {})
    finally:
        snapshot.close()
    try:
        for name, spec in TABLES.items():
            columns = [*spec.insert_columns]
            query = f"SELECT {', '.join(columns)} FROM {{db}}.{name} ORDER BY {', '.join(spec.key)}"

            def rows(db: str, columns: list[str] = columns, query: str = query) -> list[list[Any]]:
                out = []
                for row in chdb_backend.query(query.format(db=db)).rows:
                    out.append([orjson.loads(v) if c in JSON_COLUMNS and v is not None else v
                                for c, v in zip(columns, row, strict=True)])  # fmt: skip
                return out

            a, b = rows(clickhouse_database), rows(f"{clickhouse_database}_s")
            assert len(a) == len(b) > 0, (name, len(a), len(b))
            different = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            assert not different, (name, different[:2])
    finally:
        chdb_backend.command(f"DROP DATABASE IF EXISTS {clickhouse_database}_s SYNC")
