"""Projection snapshots: a projection's state saved with the Kafka positions
and watermark it reflects, restored later, and consumed onward from there.

The positions live inside each store (the Redis ``positions`` hash, the
ClickHouse ``projection_positions`` table), so saving the store saves them
too. The worker takes a snapshot between two batches (it holds the pipelines'
batch locks), so the data and the positions always agree.

- Redis: every key of the namespace, ``DUMP``ed to a file
  (``<dir>/<id>/redis.bin``), ``RESTORE``d back after the namespace is cleared.
- ClickHouse: every table of the projection's database copied into a database
  of the snapshot's own (``<db>_snap_<id>``), inside ClickHouse (fast, and the
  same SQL for chdb and a server); restored by copying back.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as redis

from cdc.lsn import format_lsn
from projections.config import PROJECTIONS
from projections.positions import Position, PositionKey, min_watermark

__all__ = ["SnapshotError", "SnapshotStore"]

_REC = struct.Struct(">IqI")  # key length, pttl (-1 = none), value length
_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{6}$")


class SnapshotError(Exception):
    """A snapshot cannot be taken, found or restored; the message says why."""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: str
    created_at: float
    meta: dict[str, Any]


def _positions_json(positions: dict[PositionKey, Position]) -> dict[str, dict[str, Any]]:
    return {
        f"{t}:{p}": {"offset": pos.offset, "watermark": format_lsn(pos.watermark)}
        for (t, p), pos in sorted(positions.items())
    }


class SnapshotStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def new_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]

    def path(self, snapshot_id: str) -> Path:
        if not _ID.match(snapshot_id):
            raise SnapshotError(f"{snapshot_id!r} is not a snapshot id (see: python -m projections snapshot list)")
        return self.directory / snapshot_id

    def list(self) -> list[dict[str, Any]]:
        out = []
        if self.directory.exists():
            for meta in sorted(self.directory.glob("*/snapshot.json")):
                out.append(orjson.loads(meta.read_bytes()))
        return out

    def read_meta(self, snapshot_id: str) -> dict[str, Any]:
        meta = self.path(snapshot_id) / "snapshot.json"
        if not meta.exists():
            raise SnapshotError(f"no snapshot {snapshot_id} in {self.directory}")
        return orjson.loads(meta.read_bytes())  # type: ignore[no-any-return]

    def write_meta(self, snapshot_id: str, meta: dict[str, Any]) -> None:
        path = self.path(snapshot_id)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "snapshot.json.tmp"
        tmp.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
        tmp.rename(path / "snapshot.json")  # the snapshot exists once its metadata does


# ---- Redis: DUMP / RESTORE of one namespace


async def _namespace_keys(client: redis.Redis, namespace: str) -> list[bytes]:
    keys: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*", count=2000):
        keys.append(key)
    return keys


async def save_redis(client: redis.Redis, namespace: str, target: Path) -> int:
    keys = await _namespace_keys(client, namespace)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with target.open("wb") as out:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.dump(key)
                pipe.pttl(key)
            results = await pipe.execute()
            for i, key in enumerate(chunk):
                value, ttl = results[2 * i], results[2 * i + 1]
                if value is None:
                    continue
                out.write(_REC.pack(len(key), ttl if ttl and ttl > 0 else -1, len(value)))
                out.write(key)
                out.write(value)
                count += 1
    return count


def _records(source: Path) -> list[tuple[bytes, int, bytes]]:
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read {source}: {exc}") from None
    out = []
    pos = 0
    try:
        while pos < len(data):
            klen, ttl, vlen = _REC.unpack_from(data, pos)
            pos += _REC.size
            if pos + klen + vlen > len(data):
                raise struct.error("truncated")
            out.append((data[pos : pos + klen], ttl, data[pos + klen : pos + klen + vlen]))
            pos += klen + vlen
    except struct.error:
        raise SnapshotError(f"{source} is truncated or damaged; nothing was restored") from None
    return out


async def restore_redis(client: redis.Redis, namespace: str, source: Path, expected: int) -> int:
    records = _records(source)  # read and check everything before touching the live keys
    if len(records) != expected:
        raise SnapshotError(f"{source} holds {len(records)} keys, its metadata says {expected}; nothing was restored")
    old = await _namespace_keys(client, namespace)
    for start in range(0, len(old), 1000):
        await client.unlink(*old[start : start + 1000])
    count = 0
    pipe = client.pipeline(transaction=False)
    for key, ttl, value in records:
        pipe.restore(key, max(ttl, 0), value, replace=True)
        count += 1
        if count % 1000 == 0:
            await pipe.execute()
            pipe = client.pipeline(transaction=False)
    await pipe.execute()
    return count


# ---- ClickHouse: copies inside ClickHouse


def _tables(backend: Any, database: str) -> list[str]:
    rows = backend.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree%' ORDER BY name",
        {"db": database},
    ).rows
    return [str(r[0]) for r in rows]


def save_clickhouse(backend: Any, database: str, snapshot_db: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    backend.command(f"CREATE DATABASE IF NOT EXISTS {snapshot_db}")
    for table in _tables(backend, database):
        backend.command(f"DROP TABLE IF EXISTS {snapshot_db}.{table}")
        backend.command(f"CREATE TABLE {snapshot_db}.{table} AS {database}.{table}")
        backend.command(f"INSERT INTO {snapshot_db}.{table} SELECT * FROM {database}.{table}")
        counts[table] = int(backend.query(f"SELECT count() FROM {snapshot_db}.{table}").rows[0][0])
    return counts


def restore_clickhouse(backend: Any, database: str, snapshot_db: str) -> dict[str, int]:
    saved = _tables(backend, snapshot_db)
    if not saved:
        raise SnapshotError(f"the ClickHouse copy {snapshot_db} is missing; the snapshot cannot be restored")
    counts: dict[str, int] = {}
    for table in _tables(backend, database):
        if table not in saved:  # made after the snapshot: it held nothing then
            backend.command(f"TRUNCATE TABLE IF EXISTS {database}.{table}")
    for table in saved:
        backend.command(f"TRUNCATE TABLE IF EXISTS {database}.{table}")
        backend.command(f"INSERT INTO {database}.{table} SELECT * FROM {snapshot_db}.{table}")
        counts[table] = int(backend.query(f"SELECT count() FROM {database}.{table}").rows[0][0])
    return counts


# ---- the worker's side: pause, save or restore, resume


def _both_run(runtime: Any) -> None:
    """A snapshot holds both projections at one point: only a worker running both takes or restores one."""
    for name in PROJECTIONS:
        if (why := runtime.not_run(name)) is not None:
            raise SnapshotError(f"a snapshot holds both projections at one point; {why}")


async def create_snapshot(runtime: Any, store: SnapshotStore) -> dict[str, Any]:
    _both_run(runtime)
    snapshot_id = store.new_id()
    pipelines = runtime.pipelines
    path = store.path(snapshot_id)
    snapshot_db = f"{runtime.clickhouse.sink.database}_snap_{snapshot_id.replace('-', '_').lower()}"
    started = time.time()
    async with _paused(pipelines):
        redis_pos = await runtime.redis.positions()
        ch_pos = await runtime.clickhouse.positions()
        keys = await save_redis(runtime.redis.client, runtime.redis.namespace, path / "redis.bin")
        counts = await asyncio.to_thread(save_clickhouse, runtime.clickhouse.backend, runtime.clickhouse.sink.database, snapshot_db)
    expected = {name: p.progress.expected for name, p in pipelines.items()}
    meta = {
        "id": snapshot_id,
        "created_at": started,
        "seconds": round(time.time() - started, 3),
        "redis": {
            "namespace": runtime.redis.namespace,
            "keys": keys,
            "positions": _positions_json(redis_pos),
            "watermark": format_lsn(min_watermark(redis_pos, expected.get("redis"))),
        },
        "clickhouse": {
            "database": runtime.clickhouse.sink.database,
            "copy": snapshot_db,
            "rows": counts,
            "positions": _positions_json(ch_pos),
            "watermark": format_lsn(min_watermark(ch_pos, expected.get("clickhouse"))),
        },
    }
    store.write_meta(snapshot_id, meta)
    return meta


async def restore_snapshot(runtime: Any, store: SnapshotStore, snapshot_id: str) -> dict[str, Any]:
    _both_run(runtime)
    meta = store.read_meta(snapshot_id)
    path = store.path(snapshot_id)
    if meta["redis"]["namespace"] != runtime.redis.namespace:
        raise SnapshotError(
            f"snapshot {snapshot_id} is of Redis namespace {meta['redis']['namespace']!r}, this worker "
            f"serves {runtime.redis.namespace!r} (a rebuild since switched generations)"
        )
    pipelines = runtime.pipelines
    async with _paused(pipelines):
        keys = await restore_redis(runtime.redis.client, runtime.redis.namespace, path / "redis.bin", meta["redis"]["keys"])
        counts = await asyncio.to_thread(
            restore_clickhouse, runtime.clickhouse.backend, runtime.clickhouse.sink.database, meta["clickhouse"]["copy"]
        )
        # consume onward from the restored positions (they may be behind Kafka's commits)
        for pipeline in pipelines.values():
            await pipeline.reseek(clear=True)
    return {"id": snapshot_id, "redis_keys": keys, "clickhouse_rows": counts,
            "redis_watermark": meta["redis"]["watermark"], "clickhouse_watermark": meta["clickhouse"]["watermark"]}  # fmt: skip


@asynccontextmanager
async def _paused(pipelines: dict[str, Any]) -> AsyncIterator[None]:
    """Every pipeline paused: no batch is applied while inside."""
    async with AsyncExitStack() as stack:
        for _, pipeline in sorted(pipelines.items()):
            await stack.enter_async_context(pipeline.paused())
        yield
