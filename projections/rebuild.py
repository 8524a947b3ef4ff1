"""Projection rebuild: a new generation built beside the live one, caught up,
then switched in atomically while the live one keeps serving.

- The new generation is a new Redis namespace (``<base>.g<N>``) and a new
  ClickHouse database (``<db>_rebuild``) with the same schema.
- It is fed either from the topics (every record from the beginning) or from a
  fresh snapshot (``--source snapshot``): the topics' end offsets are noted,
  the shop's tables are read inside one consistent snapshot of Postgres and
  written to the new generation in bulk (projections/bulk_load.py), then the
  new generation reads the topics from the offsets noted, which carry every
  change since (older ones are refused by the version guards). The snapshot's
  rows never go through Kafka, so the live projections do not see them.
- Once it is within a few records of the live projection, the live pipeline is
  paused between two batches, the new generation catches up to (or past) its
  exact positions, and the switch happens: the Redis generation pointer
  (``<base>@generation``) and ClickHouse ``EXCHANGE TABLES``. The live pipeline
  then consumes onward from the new generation's positions. The old
  generation is dropped.

Reads are served by the old generation until the switch and by the new one
after; since the new one is at or past the old one's positions at the switch,
no read fails and no watermark goes backwards.

Records the rebuild cannot read (they do not decode, or their version cannot
be upcast) are left out of the new generation, as the live pipeline leaves
them out of the live one (it dead-letters them). They are counted: ``skipped``
and ``skipped_by_stage`` in the rebuild's state (``GET /admin/rebuild``), the
CLI's progress line and final report, and a warning in the worker's log for
the first few, naming their topic, partition and offset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import Consumer, TopicPartition

from cdc.events import DomainEvent, Watermark, decode_record
from projections.bulk_load import (
    REDIS_PARTS,
    SPLIT,
    ClickHouseLoad,
    PostgresSnapshot,
    Session,
    tables_for,
    trim_recent,
)
from projections.config import PROJECTIONS
from projections.positions import Position, PositionKey
from projections.upcasting import UPCASTERS

__all__ = ["Rebuilder", "current_namespace", "generation_pointer"]

log = logging.getLogger("projections.rebuild")
# records that cannot be read: the first few are logged one by one, the rest only counted
_SKIPS_LOGGED = 20


def _first(error: BaseException) -> BaseException:
    """The first failure inside (nested) exception groups of task groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def generation_pointer(base: str) -> str:
    return f"{base}@generation"


async def current_namespace(client: Any, base: str) -> str:
    """The Redis namespace the views live in now (the base until a first rebuild)."""
    value = await client.get(generation_pointer(base))
    return value.decode() if value else base


@dataclass
class RebuildState:
    id: str
    projections: list[str]
    source: str
    status: str = "running"  # running | switching | done | failed
    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    error: str | None = None
    steps: list[str] = field(default_factory=list)
    # --source snapshot: rows written from the snapshot (also counted in done), and how long it took
    loaded: int = 0
    load_s: float | None = None
    # records left out because they could not be read, by stage (decode | upcast)
    skipped_by_stage: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_stage.values())

    def skip(self, stage: str, n: int = 1) -> None:
        self.skipped_by_stage[stage] = self.skipped_by_stage.get(stage, 0) + n

    def view(self) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(0, self.total - self.done)
        return {
            "id": self.id, "projections": self.projections, "source": self.source, "status": self.status,
            "total": self.total, "done": self.done, "rate": round(rate, 1),
            "eta_s": round(left / rate, 1) if rate > 0 and self.status == "running" else None,
            "elapsed_s": round(elapsed, 1), "error": self.error, "steps": self.steps,
            "skipped": self.skipped, "skipped_by_stage": dict(self.skipped_by_stage),
            "loaded": self.loaded, "load_s": None if self.load_s is None else round(self.load_s, 1),
        }  # fmt: skip


class Rebuilder:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.state: RebuildState | None = None
        self._task: asyncio.Task[None] | None = None
        self._drops: set[asyncio.Task[None]] = set()  # old Redis generations being deleted

    def start(self, projections: list[str], source: str) -> RebuildState:
        if self.state is not None and self.state.status in ("running", "switching"):
            raise RuntimeError(f"rebuild {self.state.id} is still {self.state.status}")
        unknown = [p for p in projections if p not in PROJECTIONS]
        if unknown or not projections:
            raise ValueError(f"unknown projection(s) {unknown}; use {', '.join(PROJECTIONS)} or all")
        for name in projections:
            if (why := self.runtime.not_run(name)) is not None:
                raise ValueError(why)
        if source not in ("topics", "snapshot"):
            raise ValueError(f"source {source!r}: use topics or snapshot")
        self.state = RebuildState(
            time.strftime("%Y%m%dT%H%M%S", time.gmtime()), projections, source
        )
        self._task = asyncio.get_running_loop().create_task(self._run(self.state))
        return self.state

    async def _run(self, state: RebuildState) -> None:
        targets: dict[str, Any] = {}
        try:
            for name in state.projections:
                targets[name] = await self._new_generation(name, state.source)
            start = await asyncio.to_thread(self._start_offsets, state.source)
            if state.source == "snapshot":
                # after the end offsets were read: every change the snapshot misses is past them
                await self._from_snapshot(state, targets, start)
            else:
                await self._feed(state, targets, start)
            if state.skipped:
                stages = ", ".join(f"{k}: {v}" for k, v in sorted(state.skipped_by_stage.items()))
                state.steps.append(
                    f"{state.skipped} records could not be read and were skipped ({stages}); the live "
                    "pipeline dead-lettered them: python -m projections dlq list"
                )
            state.status = "done"
        except Exception as exc:  # reported through /admin/rebuild; the live generation stays
            log.exception("rebuild %s failed", state.id)
            state.error = str(exc)
            for name, target in targets.items():
                if not target.switched:
                    await self._discard(state, name, target)
            state.status = "failed"
        finally:
            state.finished = time.time()

    async def _discard(self, state: RebuildState, name: str, target: Any) -> None:
        """A generation the failed rebuild did not switch in: it serves nothing, delete it."""
        try:
            await target.discard(self.runtime)
        except Exception as exc:
            log.exception(
                "rebuild %s: deleting the unfinished %s generation failed", state.id, name
            )
            state.steps.append(
                f"{name}: the unfinished generation was not deleted ({exc}); {target.unfinished}"
            )
            return
        state.steps.append(f"{name}: the unfinished generation was deleted ({target.label})")

    async def _from_snapshot(
        self,
        state: RebuildState,
        targets: dict[str, Any],
        start: dict[PositionKey, tuple[int, int]],
    ) -> None:
        """Fill the new generations from one consistent snapshot of Postgres
        (projections/bulk_load.py), every projection at once (Redis in processes of its
        own, ClickHouse on the chdb writer thread); each then catches up from the topics
        and is switched in as soon as its own load is done, without waiting for the
        others (ClickHouse's load is the shorter)."""
        snapshot = PostgresSnapshot(self.runtime.settings.pg_dsn)
        started = time.monotonic()
        loading = set(targets)

        async def rebuild(name: str, target: Any) -> None:
            try:
                await target.bulk_load(self.runtime, snapshot, state)
            finally:
                loading.discard(name)
            if not loading:  # every load is done: the exported snapshot may go
                await asyncio.to_thread(snapshot.close)
                state.load_s = time.monotonic() - started
                state.steps.append(
                    f"{state.loaded:,} rows loaded from the snapshot in {state.load_s:.1f} s "
                    "(summed over the projections)"
                )
            await self._feed(state, {name: target}, start)

        try:
            await asyncio.to_thread(snapshot.open)
            state.steps.append(
                f"snapshot of Postgres at {snapshot.label} (a temporary slot's exported snapshot)"
            )
            try:
                async with asyncio.TaskGroup() as group:
                    for name, target in targets.items():
                        group.create_task(rebuild(name, target))
            except ExceptionGroup as failed:  # the first failure says what went wrong
                raise _first(failed) from None
        finally:
            await asyncio.to_thread(snapshot.close)

    # ---- generations

    async def _new_generation(self, name: str, source: str) -> Any:
        rt = self.runtime
        if name == "redis":
            from projections.redis_views import RedisViews

            namespace = f"{rt.settings.redis_namespace}.g{int(time.time() * 1000)}"
            return _RedisTarget(RedisViews(rt.redis.client, namespace), namespace)
        from projections.clickhouse_sink import ClickHouseSink

        live = rt.clickhouse.sink.database
        db = f"{live}_rebuild"
        backend = rt.clickhouse.backend
        await asyncio.to_thread(backend.command, f"DROP DATABASE IF EXISTS {db}")
        sink = ClickHouseSink(backend, database=db)
        await asyncio.to_thread(sink.migrate)
        # a snapshot has no history: with --source snapshot the live events table stays
        return _ClickHouseTarget(sink, db, live, rt.clickhouse, keep_events=source == "snapshot")

    # ---- feeding

    def _consumer(self) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.runtime.settings.kafka_bootstrap, "group.id": f"{self.runtime.settings.app_id}.rebuild",
            "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024,
        })  # fmt: skip

    def _start_offsets(self, source: str) -> dict[PositionKey, tuple[int, int]]:
        """(start offset, end offset now) per partition."""
        consumer = self._consumer()
        try:
            out: dict[PositionKey, tuple[int, int]] = {}
            for topic in self.runtime.settings.topics:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                for p in meta.partitions:
                    lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    out[(topic, p)] = (hi if source == "snapshot" else lo, hi)
            return out
        finally:
            consumer.close()

    def _read(
        self,
        consumer: Consumer,
        positions: dict[PositionKey, Position],
        upcasters: Any,
        state: RebuildState,
    ) -> tuple[list[DomainEvent], dict[PositionKey, Position], int]:
        """One batch from the topics: its events (upcast) and the positions it reaches.
        Records that cannot be read are skipped (the live pipeline dead-lettered
        them) and counted in ``state``."""
        msgs = consumer.consume(5000, 0.2)
        events: list[DomainEvent] = []
        touched: dict[PositionKey, Position] = {}
        for msg in msgs:
            if msg.error():
                continue
            key = (str(msg.topic()), int(msg.partition() or 0))
            offset = int(msg.offset() or 0)
            watermark = positions[key].watermark
            stage = "decode"
            try:
                obj = decode_record(msg.value() or b"")
                if isinstance(obj, Watermark):
                    watermark = max(watermark, obj.lsn)
                else:
                    stage = "upcast"
                    if obj.event_version != upcasters.current(obj.event_type):
                        obj = upcasters.upcast(obj)
                    events.append(obj)
            except Exception as exc:
                state.skip(stage)
                if state.skipped <= _SKIPS_LOGGED:
                    log.warning(
                        "rebuild %s: skipped %s:%d@%d (%s failed: %s)%s", state.id, key[0], key[1], offset, stage,
                        str(exc)[:300], "; further skips are only counted" if state.skipped == _SKIPS_LOGGED else "",
                    )  # fmt: skip
            positions[key] = touched[key] = Position(offset + 1, watermark)
        return events, touched, len(msgs)

    async def _feed(
        self,
        state: RebuildState,
        targets: dict[str, Any],
        start: dict[PositionKey, tuple[int, int]],
    ) -> None:
        consumer = self._consumer()
        consumer.assign([TopicPartition(t, p, off) for (t, p), (off, _) in start.items()])
        positions: dict[PositionKey, Position] = {
            k: Position(off, 0) for k, (off, _) in start.items()
        }
        state.total += sum(hi - lo for lo, hi in start.values())
        upcasters = UPCASTERS
        pending = dict(targets)
        try:
            while pending:
                events, touched, n = await asyncio.to_thread(
                    self._read, consumer, positions, upcasters, state
                )
                state.done += n
                if n:
                    # Redis executes its script while chdb inserts: both at once
                    await asyncio.gather(
                        *(self._apply(state, t, events, touched) for t in pending.values())
                    )
                for name in list(pending):
                    if await self._maybe_switch(
                        state, name, pending, positions, consumer, upcasters
                    ):
                        del pending[name]
        finally:
            consumer.close()

    async def _apply(
        self,
        state: RebuildState,
        target: Any,
        events: list[DomainEvent],
        positions: dict[PositionKey, Position],
    ) -> None:
        """Apply a batch to a new generation. An event the store refuses on its own while
        the store answers (the live pipeline dead-lettered it) is skipped and counted
        (stage "apply"), as the live pipeline goes on past it; a store that does not
        answer fails the rebuild."""
        try:
            await target.apply(events, positions)
            return
        except Exception:
            if not events:
                raise
            await target.positions()  # raises when the store itself is the trouble
        await self._isolate(state, target, events)
        await target.apply([], positions)

    async def _isolate(self, state: RebuildState, target: Any, events: list[DomainEvent]) -> None:
        """Bisect: apply halves in order; an event failing alone is skipped."""
        try:
            await target.apply(events, {})
            return
        except Exception as exc:
            await target.positions()
            if len(events) == 1:
                state.skip("apply")
                if state.skipped <= _SKIPS_LOGGED:
                    log.warning(
                        "rebuild %s: skipped event %s (%s; apply failed: %s)", state.id,
                        events[0].event_id, events[0].event_type, str(exc)[:300],
                    )  # fmt: skip
                return
        mid = len(events) // 2
        await self._isolate(state, target, events[:mid])
        await self._isolate(state, target, events[mid:])

    def _behind(self, name: str, positions: dict[PositionKey, Position]) -> int:
        """Records the new generation must still read to reach the live one's positions,
        plus one for each partition whose watermark is still below the live one's (a
        generation bulk loaded from a snapshot starts at offsets from before it, with no
        watermark yet: switched in too early, its watermark would go backwards)."""
        live = self.runtime.pipelines[name].progress.applied
        return sum(
            max(0, live[k].offset - positions[k].offset)
            + (positions[k].watermark < live[k].watermark)
            for k in positions
            if k in live
        )

    async def _maybe_switch(
        self,
        state: RebuildState,
        name: str,
        pending: dict[str, Any],
        positions: dict[PositionKey, Position],
        consumer: Consumer,
        upcasters: Any,
    ) -> bool:
        """Switch `name` once it is close enough to the live one. `pending` holds every
        generation still being built: they share one consumer and its positions, so
        whatever is read while catching up here is applied to all of them."""
        target = pending[name]
        if self._behind(name, positions) > 2000:
            return False
        pipeline = self.runtime.pipelines[name]
        state.status = "switching"
        async with pipeline.paused():
            # the live generation is frozen now: reach (or pass) its exact positions
            while self._behind(name, positions):
                events, touched, n = await asyncio.to_thread(
                    self._read, consumer, positions, upcasters, state
                )
                if n:
                    await asyncio.gather(
                        *(self._apply(state, b, events, touched) for b in pending.values())
                    )
                state.done += n
            # every partition gets a stored position, even those with nothing new
            await target.apply([], dict(positions))
            # from here on it may serve (a switch that fails half way leaves it, never deletes it)
            target.switched = True
            await target.switch(self.runtime)
            await pipeline.reseek()
        state.steps.append(f"{name}: switched to the new generation ({target.label})")
        if target.drop_in_background:
            # the new generation serves already; deleting millions of old keys is
            # housekeeping, not part of the rebuild (its step says when it is done)
            task = asyncio.get_running_loop().create_task(self._drop(state, name, target))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)
        else:
            await self._drop(state, name, target)
        state.status = "running"
        return True

    async def _drop(self, state: RebuildState, name: str, target: Any) -> None:
        started = time.monotonic()
        try:
            await target.drop_old(self.runtime)
        except Exception as exc:  # the new generation serves; what is left is only space
            log.exception("rebuild %s: dropping the old %s generation failed", state.id, name)
            state.steps.append(
                f"{name}: the old generation was not fully dropped ({exc}); {target.leftover}"
            )
            return
        state.steps.append(f"{name}: old generation dropped in {time.monotonic() - started:.1f} s")


class _RedisTarget:
    def __init__(self, views: Any, namespace: str) -> None:
        self.views = views
        self.namespace = namespace
        self.label = f"Redis namespace {namespace}"
        self.old: str | None = None
        self.drop_in_background = True
        self.switched = False
        self.unfinished = f"delete the keys matching {namespace}:* by hand"

    @property
    def leftover(self) -> str:
        return f"delete the keys matching {self.old}:* by hand"

    async def bulk_load(
        self, runtime: Any, snapshot: PostgresSnapshot, state: RebuildState
    ) -> None:
        """The snapshot's rows into the new namespace, by ``python -m projections.bulk_load``,
        one process per part (REDIS_PARTS): the worker's interpreter stays free for the
        live pipelines and the API. Their progress lines feed the rebuild's counts."""
        split = await asyncio.to_thread(self._split, runtime, snapshot)
        async with asyncio.TaskGroup() as group:
            for part in REDIS_PARTS:
                group.create_task(self._load_part(runtime, snapshot, state, part, split))
        client = redis.Redis.from_url(runtime.settings.redis_url)
        try:
            started = time.monotonic()
            await asyncio.to_thread(trim_recent, client, self.namespace)
            state.steps.append(
                f"redis: recent orders trimmed in {time.monotonic() - started:.1f} s"
            )
        finally:
            client.close()

    @staticmethod
    def _split(runtime: Any, snapshot: PostgresSnapshot) -> str | None:
        session = Session(runtime.settings.pg_dsn, snapshot.name, snapshot.lsn, ["orders"])
        try:
            return session.split_key("orders", SPLIT)
        finally:
            session.close()

    async def _load_part(
        self,
        runtime: Any,
        snapshot: PostgresSnapshot,
        state: RebuildState,
        part: str,
        split: str | None,
    ) -> None:
        settings = runtime.settings
        env = {**os.environ, "PG_DSN": settings.pg_dsn, "REDIS_URL": settings.redis_url}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "projections.bulk_load", "redis", "--part", part,
            "--snapshot", snapshot.name, "--lsn", snapshot.label, "--namespace", self.namespace,
            *(("--split", split) if split is not None else ()),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        errors = asyncio.ensure_future(proc.stderr.read())
        rows = 0
        started = time.monotonic()
        try:
            async for line in proc.stdout:
                message = orjson.loads(line)
                state.total += message.get("total", 0)
                if "rows" in message:
                    state.done += message["rows"] - rows
                    state.loaded += message["rows"] - rows
                    rows = message["rows"]
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = (await errors).decode(errors="replace").strip()
        if code != 0:
            raise RuntimeError(text[-2000:] or f"the Redis bulk load ({part}) exited with {code}")
        state.steps.append(f"redis ({part}): {rows:,} rows in {time.monotonic() - started:.1f} s")

    async def apply(
        self, events: list[DomainEvent], positions: dict[PositionKey, Position]
    ) -> None:
        await self.views.apply(events, positions)

    async def positions(self) -> Any:
        return await self.views.positions()

    async def discard(self, runtime: Any) -> None:
        await _unlink_namespace(runtime.redis.client, self.namespace)

    async def switch(self, runtime: Any) -> None:
        base = runtime.settings.redis_namespace
        self.old = runtime.redis.namespace
        await runtime.redis.client.set(generation_pointer(base), self.namespace)
        runtime.redis.use(self.namespace)

    async def drop_old(self, runtime: Any) -> None:
        if self.old is None or self.old == self.namespace:
            return
        await _unlink_namespace(runtime.redis.client, self.old)


async def _unlink_namespace(client: Any, namespace: str) -> None:
    """Delete every key of a generation's namespace, a thousand per call."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


class _ClickHouseTarget:
    def __init__(
        self, sink: Any, database: str, live: str, adapter: Any, keep_events: bool = False
    ) -> None:
        self.sink = sink
        self.adapter = adapter
        self.database = database
        self.live = live
        self.keep_events = keep_events
        self.drop_in_background = False  # one DROP DATABASE; a next rebuild reuses the name
        self.leftover = f"run DROP DATABASE {database} by hand"
        self.unfinished = f"{database} is dropped by the next rebuild"
        self.switched = False
        self.label = f"ClickHouse tables built in {database}, exchanged into {live}"
        if keep_events:
            self.label += " (events: the live table kept)"

    async def bulk_load(
        self, runtime: Any, snapshot: PostgresSnapshot, state: RebuildState
    ) -> None:
        """The snapshot's rows into the new tables: Postgres' COPY text, in blocks,
        inserted on the live sink's writer thread (one thread writes to chdb at a time;
        a live batch waits for one block at most) while the next block is read."""
        loop = asyncio.get_running_loop()
        started, loaded = time.monotonic(), 0
        load = ClickHouseLoad(self.sink, snapshot.lsn)
        session = await asyncio.to_thread(
            Session,
            runtime.settings.pg_dsn,
            snapshot.name,
            snapshot.lsn,
            tables_for(["clickhouse"]),
        )
        inflight: list[asyncio.Future[None]] = []
        try:
            state.total += await asyncio.to_thread(session.estimate)
            for table in session.tables:
                blocks = load.blocks(session, table)
                while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                    inflight.append(
                        loop.run_in_executor(self.adapter._writer, load.insert, table, block)
                    )
                    if len(inflight) > 1:
                        await inflight.pop(0)
                    rows = block.count(b"\n")  # COPY text escapes newlines inside values
                    state.done += rows
                    state.loaded += rows
                    loaded += rows
            while inflight:
                await inflight.pop(0)
        finally:
            await asyncio.gather(*inflight, return_exceptions=True)
            await asyncio.to_thread(session.close)
        state.steps.append(f"clickhouse: {loaded:,} rows in {time.monotonic() - started:.1f} s")

    async def apply(
        self, events: list[DomainEvent], positions: dict[PositionKey, Position]
    ) -> None:
        # on the live sink's writer thread: one thread writes to chdb at a time
        await asyncio.get_running_loop().run_in_executor(
            self.adapter._writer, self.sink.apply, events, positions
        )

    async def switch(self, runtime: Any) -> None:
        backend = runtime.clickhouse.backend

        def exchange() -> None:
            rows = backend.query(
                "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree%'",
                {"db": self.database},
            ).rows
            tables = [table for (table,) in rows]
            if self.keep_events:
                # the history stays; it gets what the new generation read while catching
                # up (the live pipeline is paused: nothing else writes it now; a row
                # already there is collapsed by the table's deduplication on event_id)
                backend.command(
                    f"INSERT INTO {self.live}.events SELECT * FROM {self.database}.events"
                )
                tables.remove("events")
            backend.exchange_tables([(f"{self.live}.{t}", f"{self.database}.{t}") for t in tables])

        await asyncio.to_thread(exchange)

    async def positions(self) -> Any:
        return await asyncio.to_thread(self.sink.positions)

    async def discard(self, runtime: Any) -> None:
        await self.drop_old(runtime)  # the new tables are still in self.database

    async def drop_old(self, runtime: Any) -> None:
        await asyncio.to_thread(
            runtime.clickhouse.backend.command, f"DROP DATABASE IF EXISTS {self.database}"
        )
