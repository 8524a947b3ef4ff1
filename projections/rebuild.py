"""Projection rebuild: a new generation built beside the live one, caught up,
then switched in atomically while the live one keeps serving.

- The new generation is a new Redis namespace (``<base>.g<N>``) and a new
  ClickHouse database (``<db>_rebuild``) with the same schema.
- It is fed either from the topics (every record from the beginning) or from a
  fresh incremental snapshot (``--source snapshot``: the capture is asked,
  through its signal table, to read every table again; the new generation reads
  the topics from their current end, which then carry every row as a read plus
  every change since).
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
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from cdc.events import DomainEvent, Watermark, decode_record
from projections.positions import Position, PositionKey

__all__ = ["Rebuilder", "current_namespace", "generation_pointer"]

log = logging.getLogger("projections.rebuild")
# records that cannot be read: the first few are logged one by one, the rest only counted
_SKIPS_LOGGED = 20


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
        }  # fmt: skip


class Rebuilder:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.state: RebuildState | None = None
        self._task: asyncio.Task[None] | None = None
        self._snapshot_request: str | None = None
        self._snapshot_checked = 0.0
        self._snapshot_finished = False
        # --source snapshot: the topics' end offsets once the capture said the snapshot
        # is done (every read it published is before them); the new generation reads
        # at least this far before it is switched in
        self._snapshot_end: dict[PositionKey, int] = {}
        self._snapshot_estimate = 0

    def start(self, projections: list[str], source: str) -> RebuildState:
        if self.state is not None and self.state.status in ("running", "switching"):
            raise RuntimeError(f"rebuild {self.state.id} is still {self.state.status}")
        unknown = [p for p in projections if p not in self.runtime.pipelines]
        if unknown or not projections:
            raise ValueError(f"unknown projection(s) {unknown}; use redis, clickhouse or all")
        if source not in ("topics", "snapshot"):
            raise ValueError(f"source {source!r}: use topics or snapshot")
        self.state = RebuildState(
            time.strftime("%Y%m%dT%H%M%S", time.gmtime()), projections, source
        )
        self._task = asyncio.get_running_loop().create_task(self._run(self.state))
        return self.state

    async def _run(self, state: RebuildState) -> None:
        self._snapshot_request, self._snapshot_finished, self._snapshot_end = None, False, {}
        self._snapshot_estimate = 0
        try:
            targets = {name: await self._new_generation(name) for name in state.projections}
            start = await asyncio.to_thread(self._start_offsets, state.source)
            if state.source == "snapshot":
                await asyncio.to_thread(self._request_snapshot)
                state.steps.append("incremental snapshot requested from the capture")
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
            state.status = "failed"
            state.error = str(exc)
        finally:
            state.finished = time.time()

    # ---- generations

    async def _new_generation(self, name: str) -> Any:
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
        return _ClickHouseTarget(sink, db, live, rt.clickhouse)

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

    def _request_snapshot(self) -> None:
        import psycopg

        from cdc.signals import send_snapshot_signal

        with psycopg.connect(
            self.runtime.settings.pg_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            self._snapshot_request = send_snapshot_signal(conn, None, [])
        self._snapshot_finished = False

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
        state.total = sum(hi - lo for lo, hi in start.values())
        upcasters = self.runtime.pipelines[state.projections[0]].projector.upcasters
        pending = dict(targets)
        try:
            while pending:
                events, touched, n = await asyncio.to_thread(
                    self._read, consumer, positions, upcasters, state
                )
                state.done += n
                if state.total < self._snapshot_estimate:
                    state.total = self._snapshot_estimate
                if n:
                    for target in pending.values():
                        await target.apply(events, touched)
                for name in list(pending):
                    if await self._maybe_switch(
                        state, name, pending, positions, consumer, upcasters
                    ):
                        del pending[name]
        finally:
            consumer.close()

    def _behind(self, name: str, positions: dict[PositionKey, Position]) -> int:
        """Records the new generation must still read before it may replace the live one:
        up to the live one's positions, and with --source snapshot up to the end of the
        snapshot (the live positions alone say nothing about that: the new generation
        started at the end of the topics, and the live one may be behind the snapshot's
        reads as well)."""
        live = self.runtime.pipelines[name].projector.progress.applied
        end = self._snapshot_end
        return sum(
            max(0, max(live[k].offset if k in live else 0, end.get(k, 0)) - positions[k].offset)
            for k in positions
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
        if state.source == "snapshot" and not await self._snapshot_done():
            return False
        if self._behind(name, positions) > 2000:
            return False
        pipeline = self.runtime.pipelines[name]
        state.status = "switching"
        async with pipeline.batch_lock:
            # the live generation is frozen now: reach (or pass) its exact positions
            while self._behind(name, positions):
                events, touched, n = await asyncio.to_thread(
                    self._read, consumer, positions, upcasters, state
                )
                if n:
                    for building in pending.values():
                        await building.apply(events, touched)
                state.done += n
            # every partition gets a stored position, even those with nothing new
            await target.apply([], dict(positions))
            await target.switch(self.runtime)
            if pipeline.consumer is not None:
                await pipeline.seek_to_stored(pipeline.consumer.assignment())
        state.steps.append(f"{name}: switched to the new generation ({target.label})")
        await target.drop_old(self.runtime)
        state.steps.append(f"{name}: old generation dropped")
        state.status = "running"
        return True

    async def _snapshot_done(self) -> bool:
        """Has the capture finished the snapshot this rebuild asked for? Asked of
        Postgres at most every 2 s, not per batch."""
        if self._snapshot_finished:
            return True
        now = time.monotonic()
        if now - self._snapshot_checked < 2.0:
            return False
        self._snapshot_checked = now
        if await asyncio.to_thread(self._query_snapshot_status) != "done":
            return False
        # 'done' is recorded once Kafka acknowledged the last chunk's reads: they are
        # all before the end offsets read now
        ends = await asyncio.to_thread(self._start_offsets, "topics")
        self._snapshot_end = {k: hi for k, (_, hi) in ends.items()}
        self._snapshot_finished = True
        return True

    def _query_snapshot_status(self) -> str | None:
        import psycopg

        with psycopg.connect(
            self.runtime.settings.pg_dsn, autocommit=True, connect_timeout=10
        ) as conn:
            row = conn.execute(
                # reltuples is -1 until a table's first ANALYZE; n_live_tup is kept from the start
                "select status, (select coalesce(sum(greatest(c.reltuples, st.n_live_tup, 0)), 0)::bigint"
                " from pg_class c left join pg_stat_user_tables st on st.relid = c.oid"
                " where c.oid in (select to_regclass(t) from unnest(s.tables) t))"
                " from readside_cdc.incremental_snapshots s where request_id = %s",
                (self._snapshot_request,),
            ).fetchone()
        if row is not None:
            # rows the capture will read (the planner's estimate): the progress bar's total
            self._snapshot_estimate = int(row[1] or 0)
        if row is not None and row[0] == "failed":
            raise RuntimeError(
                f"the capture's snapshot {self._snapshot_request} failed; see python -m cdc snapshot --status"
            )
        return str(row[0]) if row else None


class _RedisTarget:
    def __init__(self, views: Any, namespace: str) -> None:
        self.views = views
        self.namespace = namespace
        self.label = f"Redis namespace {namespace}"
        self.old: str | None = None

    async def apply(
        self, events: list[DomainEvent], positions: dict[PositionKey, Position]
    ) -> None:
        await self.views.apply(events, positions)

    async def switch(self, runtime: Any) -> None:
        base = runtime.settings.redis_namespace
        self.old = runtime.redis.namespace
        await runtime.redis.client.set(generation_pointer(base), self.namespace)
        runtime.redis.use(self.namespace)

    async def drop_old(self, runtime: Any) -> None:
        if self.old is None or self.old == self.namespace:
            return
        client = runtime.redis.client
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{self.old}:*", count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)


class _ClickHouseTarget:
    def __init__(self, sink: Any, database: str, live: str, adapter: Any) -> None:
        self.sink = sink
        self.adapter = adapter
        self.database = database
        self.live = live
        self.label = f"ClickHouse tables built in {database}, exchanged into {live}"

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
            backend.exchange_tables(
                [(f"{self.live}.{table}", f"{self.database}.{table}") for (table,) in rows]
            )

        await asyncio.to_thread(exchange)

    async def drop_old(self, runtime: Any) -> None:
        await asyncio.to_thread(
            runtime.clickhouse.backend.command, f"DROP DATABASE IF EXISTS {self.database}"
        )
