"""The projection worker: a Faust app whose pipelines feed Redis and ClickHouse from the event topics.

Each projection (redis, clickhouse) is a pipeline of its own: its own Kafka
consumer group, batches, positions and watermark, so a slow ClickHouse insert
never delays the Redis views. The Redis pipeline runs in a child process of
the worker (projections/redis_process.py: its own interpreter lock). A batch is

    take(n, within)  ->  decode  ->  upcast  ->  apply to the sink (positions
    stored in the same write)  ->  commit the offsets to Kafka

with the take, decode and digest of the next batch running while the current
one is applied. The sink's stored positions, not Kafka's committed offsets, say where a
pipeline resumes: on every partition assignment it seeks to them. A crash
anywhere (kill -9 included) therefore redelivers whatever the sink had not
stored, and the version guards make the redelivery harmless.

Why not Faust agents and ``stream.take()``: measured on the 2-core
development machine, a Faust agent stream delivered ~3k records/s where
aiokafka's ``getmany`` delivered ~85k/s (the agent path creates asyncio tasks
per message in ``Consumer._drain_messages``); and ``take()`` acks the events
of the batch it yielded in a ``finally`` block, which also runs when the
generator is closed by an exception or a worker stop mid-batch, so Faust
would then commit offsets of a batch that was never applied. Here Faust
runs the worker, its lifecycle and the web server (the query API); the
ClickHouse pipeline and the Redis process's handle are mode Services the Faust
worker starts and stops with it.
See docs/projections.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import faust
import redis.asyncio as redis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from faust.app.base import BootStrategy
from mode import Service

from cdc.events import DecodeError, DomainEvent, Watermark, decode_record
from cdc.lsn import format_lsn
from projections.config import Settings, mask_url
from projections.dlq import DeadLetter, DeadLetterQueue
from projections.heap import HEAP
from projections.metrics import ProjectionMetrics
from projections.positions import Position, PositionKey, min_watermark
from projections.redis_reads import ReadConnections
from projections.upcasting import UPCASTERS, UpcastError, Upcasters

__all__ = [
    "ClickHouseAdapter",
    "LivePipeline",
    "Pipeline",
    "Progress",
    "Projector",
    "Record",
    "RecordLike",
    "RedisAdapter",
    "Runtime",
    "Sink",
    "build_app",
    "build_runtime",
]

log = logging.getLogger("projections")


class RecordLike(Protocol):
    """What the projector reads of a Kafka record: aiokafka's ConsumerRecord as the
    pipeline fetched it (no copy per record), or a Record."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as the projector needs it (for records not from aiokafka)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Sink(Protocol):
    """What a pipeline needs from a projection's store (RedisViews, ClickHouseSink)."""

    name: str

    def prepare(self, events: list[DomainEvent]) -> Any:
        """Work on a batch that needs no store (a digest), done while the previous batch
        is being applied; its result goes to apply(). None: nothing to do ahead."""
        ...

    async def apply(
        self,
        events: list[DomainEvent],
        positions: dict[PositionKey, Position],
        prepared: Any = None,
    ) -> None: ...

    async def positions(self) -> dict[PositionKey, Position]: ...

    async def close(self) -> None: ...


class RedisAdapter:
    name = "redis"

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.base = namespace
        self.reads = ReadConnections(client)  # connections made on the API's first read
        self.use(namespace)

    def use(self, namespace: str) -> None:
        """Serve (and write) the views of this namespace: a generation switch is this one assignment."""
        from projections.redis_views import RedisViews

        self.namespace = namespace
        self.views = RedisViews(self.client, namespace, reads=self.reads)

    async def resolve(self) -> None:
        """Follow the generation pointer a rebuild left (projections/rebuild.py)."""
        from projections.rebuild import current_namespace

        namespace = await current_namespace(self.client, self.base)
        if namespace != self.namespace:
            self.use(namespace)

    def prepare(self, events: list[DomainEvent]) -> Any:
        return self.views.prepare(events)

    async def apply(
        self,
        events: list[DomainEvent],
        positions: dict[PositionKey, Position],
        prepared: Any = None,
    ) -> None:
        await self.views.apply(events, positions, prepared)

    async def positions(self) -> dict[PositionKey, Position]:
        return await self.views.positions()

    async def close(self) -> None:
        await self.reads.close()
        await self.client.aclose()


class ClickHouseAdapter:
    """The ClickHouse sink is synchronous (chdb runs in-process): it gets a thread of its own."""

    name = "clickhouse"

    def __init__(self, url: str) -> None:
        from projections.clickhouse_backend import open_backend
        from projections.clickhouse_sink import ClickHouseSink

        self.backend = open_backend(url)
        self.sink = ClickHouseSink(self.backend)
        self.sink.migrate()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="clickhouse-apply")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="clickhouse-query")

    def prepare(self, events: list[DomainEvent]) -> Any:
        return None  # the digest runs in the apply thread, off the event loop

    async def apply(
        self,
        events: list[DomainEvent],
        positions: dict[PositionKey, Position],
        prepared: Any = None,
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self.sink.apply, events, positions
        )

    async def positions(self) -> dict[PositionKey, Position]:
        return await asyncio.get_running_loop().run_in_executor(self._readers, self.sink.positions)

    async def query(self, fn: Any, *args: Any) -> Any:
        """Run a read (revenue, funnel, readonly_query) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.backend.close()


@dataclass(slots=True)
class Progress:
    """What a projection has applied: positions per partition, for /status and min_lsn waits."""

    name: str
    expected: set[PositionKey] = field(default_factory=set)
    applied: dict[PositionKey, Position] = field(default_factory=dict)
    applied_ts: dict[PositionKey, int] = field(
        default_factory=dict
    )  # ts_ms of the applied watermark
    seen_lsn: int = 0  # newest Watermark consumed, applied or not
    seen_ts: int = 0
    events: int = 0
    dead_letters: int = 0
    last_batch_at: float | None = None
    offset_lag: int | None = None
    # called after every change of the applied positions (the Redis process reports them)
    listener: Callable[[Progress], None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def watermark(self) -> int:
        return min_watermark(self.applied, self.expected)

    def record_applied(
        self, positions: dict[PositionKey, Position], ts: dict[PositionKey, int]
    ) -> None:
        for key, pos in positions.items():
            old = self.applied.get(key)
            if old is None or pos.offset >= old.offset:
                self.applied[key] = pos
                if key in ts:
                    self.applied_ts[key] = ts[key]
        self.last_batch_at = time.time()
        self._changed.set()
        self._changed = asyncio.Event()
        if self.listener is not None:
            self.listener(self)

    def clear(self) -> None:
        """Forget the applied positions (a snapshot restore moves them back)."""
        self.applied.clear()
        if self.listener is not None:
            self.listener(self)

    def set_offset_lag(self, lag: int) -> None:
        self.offset_lag = lag
        if self.listener is not None:
            self.listener(self)

    def snapshot(self) -> dict[str, Any]:
        """Everything /status, the metrics and min_lsn waits read, as JSON-able values."""
        return {
            "expected": sorted(self.expected),
            "applied": [(t, p, pos.offset, pos.watermark) for (t, p), pos in self.applied.items()],
            "applied_ts": [(t, p, ts) for (t, p), ts in self.applied_ts.items()],
            "seen": (self.seen_lsn, self.seen_ts),
            "events": self.events,
            "dead_letters": self.dead_letters,
            "last_batch_at": self.last_batch_at,
            "offset_lag": self.offset_lag,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Take over a snapshot() made elsewhere (the Redis process's), and wake min_lsn waits."""
        self.expected = {(t, p) for t, p in state["expected"]}
        self.applied = {(t, p): Position(off, wm) for t, p, off, wm in state["applied"]}
        self.applied_ts = {(t, p): ts for t, p, ts in state["applied_ts"]}
        self.seen_lsn, self.seen_ts = state["seen"]
        self.events = state["events"]
        self.dead_letters = state["dead_letters"]
        self.last_batch_at = state["last_batch_at"]
        self.offset_lag = state["offset_lag"]
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, lsn: int, timeout_s: float) -> bool:
        """True once the watermark is >= lsn; False when timeout_s passes first."""
        deadline = time.monotonic() + timeout_s
        while self.watermark() < lsn:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return self.watermark() >= lsn
        return True

    def lag(self) -> tuple[int, float | None]:
        """(bytes, seconds) between the newest watermark seen and the applied one."""
        wm = self.watermark()
        lag_bytes = max(0, self.seen_lsn - wm)
        if lag_bytes == 0:
            return 0, 0.0
        slowest = [self.applied_ts.get(k, 0) for k in self.expected or self.applied]
        applied_ts = min(slowest) if slowest else 0
        if not applied_ts or not self.seen_ts:
            return lag_bytes, None
        return lag_bytes, max(0.0, (self.seen_ts - applied_ts) / 1000)

    def status(self) -> dict[str, Any]:
        lag_bytes, lag_seconds = self.lag()
        wm = self.watermark()
        return {
            "watermark": format_lsn(wm),
            "lag_bytes": lag_bytes,
            "lag_seconds": lag_seconds,
            "newest_watermark_seen": format_lsn(self.seen_lsn),
            "offset_lag": self.offset_lag,
            "events_applied": self.events,
            "dead_letters": self.dead_letters,
            "last_batch_at": self.last_batch_at,
            "partitions": {
                f"{t}:{p}": {
                    "offset": pos.offset if pos else None,
                    "watermark": format_lsn(pos.watermark) if pos else None,
                }
                for (t, p) in sorted(self.expected | set(self.applied))
                for pos in (self.applied.get((t, p)),)
            },
        }


Decoded = tuple[Any, Any]


@dataclass(slots=True)
class Batch:
    """Records read and decoded, not applied yet (Projector.prepare -> Projector.commit)."""

    records: int
    events: list[DomainEvent]
    origins: list[RecordLike]
    letters: list[DeadLetter]
    offsets: dict[PositionKey, int]  # the next offset per partition
    marks: dict[PositionKey, tuple[int, int]]  # the newest Watermark per partition: (lsn, ts_ms)
    upcasts: int
    prepared: Any = None
    epoch: int = 0


_INFRA_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)


class Projector:
    """One projection's batch logic: decode, upcast, apply with isolation of bad events, dead letters.

    Bad records never stop the pipeline: a record that does not decode or
    upcast, or an event the sink keeps refusing while the store itself
    answers, goes to the dead-letter topic. When the store does not answer,
    the batch is retried until it does (nothing is dead-lettered for an
    outage).
    """

    def __init__(
        self,
        sink: Sink,
        dlq: DeadLetterQueue,
        metrics: ProjectionMetrics,
        *,
        upcasters: Upcasters = UPCASTERS,
        attempts: int = 3,
        retry_delay_s: float = 0.05,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.dlq = dlq
        self.metrics = metrics
        self.upcasters = upcasters
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.max_backoff_s = max_backoff_s
        self.progress = Progress(sink.name)
        # newest Watermark consumed per partition: (lsn, ts_ms); stored with the next batch
        self._running: dict[PositionKey, tuple[int, int]] = {}
        self._events = metrics.events.labels(self.name)
        self._records = metrics.records.labels(self.name)
        self._batch_size = metrics.batch_size.labels(self.name)
        self._apply_seconds = metrics.apply_seconds.labels(self.name)

    async def resume(self, keys: Iterable[PositionKey]) -> dict[PositionKey, Position]:
        """The sink's stored positions for these partitions; the running watermarks restart from them."""
        stored: dict[PositionKey, Position] = await self._retry_infra(
            self.sink.positions, "read positions"
        )
        for key in keys:
            pos = stored.get(key)
            self._running[key] = (pos.watermark, 0) if pos else (0, 0)
        self.progress.record_applied({k: v for k, v in stored.items() if k in set(keys)}, {})
        return stored

    async def process(self, records: Sequence[RecordLike]) -> dict[PositionKey, int]:
        """Apply one batch; returns the next offset per partition (what may be committed)."""
        return await self.commit(await self.prepare(records))

    async def prepare(self, records: Sequence[RecordLike]) -> Batch:
        """Decode and upcast a batch, and the sink's work that needs no store.

        Changes nothing of the projector's state, so the pipeline runs it for
        the next batch while the current one is applied, and drops it when a
        seek (a rebalance, a rebuild, a restore) makes it stale.
        """
        events: list[DomainEvent] = []
        origins: list[RecordLike] = []
        letters: list[DeadLetter] = []
        offsets: dict[PositionKey, int] = {}
        marks: dict[PositionKey, tuple[int, int]] = {}
        upcasts = 0
        prepared = None
        with HEAP.decoding(len(records)):  # the collector kept off the batch (heap.py)
            for n, rec in enumerate(records, 1):
                if n % 100 == 0:
                    await asyncio.sleep(0)  # the API runs between chunks (~1 ms each)
                key = (rec.topic, rec.partition)
                offsets[key] = rec.offset + 1
                decoded = self._decode(rec.value)
                obj = decoded[0]
                if obj.__class__ is DomainEvent:
                    events.append(obj)
                    origins.append(rec)
                    upcasts += decoded[1] is not None
                elif obj.__class__ is Watermark:
                    if obj.lsn > marks.get(key, (0, 0))[0]:
                        marks[key] = (obj.lsn, obj.ts_ms)
                else:
                    letters.append(self._letter(rec, obj, decoded[1], 1))
            if events:
                try:
                    prepared = self.sink.prepare(events)
                except Exception:
                    prepared = None  # apply() digests again, and isolates what fails
        return Batch(len(records), events, origins, letters, offsets, marks, upcasts, prepared)

    async def commit(self, batch: Batch) -> dict[PositionKey, int]:
        """Apply a prepared batch with its positions; returns the next offset per partition."""
        running = self._running
        for key, mark in batch.marks.items():
            if mark[0] > running.get(key, (0, 0))[0]:
                running[key] = mark
        offsets = batch.offsets
        events = batch.events
        if batch.upcasts:
            self.metrics.upcasts.labels(self.name).inc(batch.upcasts)
        positions = {k: Position(off, running.get(k, (0, 0))[0]) for k, off in offsets.items()}
        started = time.perf_counter()
        if batch.letters:
            # before the positions that move past them are stored: a crash re-sends, never loses
            await self._send_letters(batch.letters)
        await self._apply(events, batch.origins, positions, batch.prepared)
        self._apply_seconds.observe(time.perf_counter() - started)
        self._batch_size.observe(batch.records)
        self._records.inc(batch.records)
        self._events.inc(len(events))
        progress = self.progress
        progress.events += len(events)
        for key in offsets:
            lsn, ts = running.get(key, (0, 0))
            if lsn > progress.seen_lsn:
                progress.seen_lsn, progress.seen_ts = lsn, ts
        progress.record_applied(positions, {k: running[k][1] for k in offsets if k in running})
        wm = progress.watermark()
        self.metrics.watermark.labels(self.name).set(wm)
        lag_bytes, lag_seconds = progress.lag()
        self.metrics.lag_bytes.labels(self.name).set(lag_bytes)
        if lag_seconds is not None:
            self.metrics.lag_seconds.labels(self.name).set(lag_seconds)
        return offsets

    def _decode(self, value: bytes | None) -> Decoded:
        """(event, "upcast" if it was), (watermark, None) or (stage, error) of a dead letter."""
        try:
            if value is None:
                raise DecodeError("record has no value (a tombstone?); expected a domain event")
            obj = decode_record(value)
        except DecodeError as exc:
            return ("decode", str(exc))
        if obj.__class__ is Watermark:
            return (obj, None)
        assert isinstance(obj, DomainEvent)
        if obj.event_version == self.upcasters.current(obj.event_type):
            return (obj, None)
        try:
            return (self.upcasters.upcast(obj), "upcast")
        except UpcastError as exc:
            return ("upcast", str(exc))

    def _letter(self, rec: RecordLike, stage: str, error: str, attempts: int) -> DeadLetter:
        return DeadLetter(
            rec.topic,
            rec.partition,
            rec.offset,
            rec.key,
            rec.value,
            self.name,
            stage,
            error,
            attempts,
        )

    async def _send_letters(self, letters: list[DeadLetter]) -> None:
        await self._retry_infra(lambda: self.dlq.send(letters), "send dead letters")
        for letter in letters:
            self.metrics.dead_letters.labels(self.name, letter.stage).inc()
        self.progress.dead_letters += len(letters)
        first = letters[0]
        log.warning(
            "%s: %d record(s) sent to the dead-letter topic, first %s[%d]@%d (%s): %s",
            self.name, len(letters), first.topic, first.partition, first.offset, first.stage,
            first.error[:300],
        )  # fmt: skip

    async def _apply(
        self,
        events: list[DomainEvent],
        origins: list[RecordLike],
        positions: dict[PositionKey, Position],
        prepared: Any = None,
    ) -> None:
        attempt = 0
        while True:
            try:
                await self.sink.apply(events, positions, prepared)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if await self._outage(exc, attempt, "apply"):
                    continue
                if attempt < self.attempts:
                    await asyncio.sleep(self.retry_delay_s * attempt)
                    continue
                log.warning(
                    "%s: a batch of %d events failed %d times while the store answers "
                    "(%s: %s); looking for the events that fail on their own",
                    self.name, len(events), attempt, type(exc).__name__, str(exc)[:300],
                )  # fmt: skip
                break
        letters: list[DeadLetter] = []
        await self._isolate(events, origins, letters)
        if letters:
            await self._send_letters(letters)
        await self._retry_infra(lambda: self.sink.apply([], positions), "store positions")

    async def _isolate(
        self, events: list[DomainEvent], origins: list[RecordLike], letters: list[DeadLetter]
    ) -> None:
        """Bisect: apply halves in order; an event failing alone `attempts` times is a dead letter."""
        if not events:
            return
        # the error's text, not the exception: kept past its except block, an exception's
        # traceback holds this frame, whose locals hold the batch, in a cycle that only the
        # cyclic collector frees (late, and never while a batch freeze holds it; heap.py)
        error = ""
        tries = 1 if len(events) > 1 else self.attempts
        attempt = 0
        while attempt < tries:
            try:
                await self.sink.apply(events, {})
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if await self._outage(exc, attempt + 1, "apply"):
                    continue
                attempt += 1
                error = f"{type(exc).__name__}: {exc}"
        if len(events) == 1:
            letters.append(self._letter(origins[0], "apply", error, attempt))
            return
        mid = len(events) // 2
        await self._isolate(events[:mid], origins[:mid], letters)
        await self._isolate(events[mid:], origins[mid:], letters)

    async def _outage(self, exc: Exception, attempt: int, what: str) -> bool:
        """True (after a backoff) when the store itself is unreachable: retry, dead-letter nothing."""
        self.metrics.errors.labels(self.name, type(exc).__name__).inc()
        if not isinstance(exc, _INFRA_ERRORS):
            try:
                await self.sink.positions()
                return False
            except Exception:
                pass
        delay = min(self.max_backoff_s, self.retry_delay_s * 2 ** min(attempt, 10))
        if attempt == 1 or attempt % 10 == 0:
            log.error(
                "%s: %s failed, the store does not answer (%s: %s); retrying in %.1f s",
                self.name, what, type(exc).__name__, str(exc)[:300], delay,
            )  # fmt: skip
        await asyncio.sleep(delay)
        return True

    async def _retry_infra(self, fn: Any, what: str) -> Any:
        attempt = 0
        while True:
            try:
                return await fn()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = min(self.max_backoff_s, self.retry_delay_s * 2 ** min(attempt, 10))
                self.metrics.errors.labels(self.name, type(exc).__name__).inc()
                if attempt == 1 or attempt % 10 == 0:
                    log.error(
                        "%s: %s failed (%s: %s); retrying in %.1f s",
                        self.name, what, type(exc).__name__, str(exc)[:300], delay,
                    )  # fmt: skip
                await asyncio.sleep(delay)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # wait for the batch in flight: its positions and offsets go out first
        async with self.pipeline.batch_lock:
            self.pipeline.epoch += 1

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self.pipeline.batch_lock:
            await self.pipeline.seek_to_stored(assigned)


class Pipeline(Service):
    """One projection's Kafka consumer loop (a mode Service the Faust worker runs)."""

    def __init__(
        self,
        projector: Projector,
        *,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        batch_max: int,
        batch_wait_s: float,
        **kwargs: Any,
    ) -> None:
        self.projector = projector
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = tuple(topics)
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.batch_lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self._committing: asyncio.Future[None] | None = None
        # the next batch, read and prepared while the current one is applied
        self._ahead: asyncio.Future[Batch | None] | None = None
        # bumped on every seek and revocation: a batch read before it is stale
        self.epoch = 0
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        return f"Pipeline[{self.projector.name}]"

    # ---- what the worker's API, rebuilds and snapshots use (LivePipeline)

    @property
    def progress(self) -> Progress:
        return self.projector.progress

    @property
    def running(self) -> bool:
        return not self.should_stop and self.consumer is not None

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No batch is applied inside: the store may be changed under the pipeline."""
        async with self.batch_lock:
            yield

    async def reseek(self, *, clear: bool = False) -> None:
        """Read on from the store's positions (inside paused(), after the store changed);
        `clear` forgets the positions shown so far (a snapshot restore moves them back)."""
        if clear:
            self.progress.clear()
        if self.consumer is not None:
            await self.seek_to_stored(self.consumer.assignment())

    async def on_start(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            max_poll_interval_ms=600_000,
            # the broker answers a fetch once it has 32 kB for it, or after 25 ms: with
            # min 1 byte, a trickle of records (cdc's watermarks alone) made hundreds of
            # fetches a second per consumer, each costing the worker and the broker CPU
            fetch_min_bytes=32 * 1024,
            fetch_max_wait_ms=25,
            # a loaded 2-core machine can starve the heartbeat for seconds; a rebalance is
            # harmless (the store's positions decide) but costs a re-read
            session_timeout_ms=30_000,
            heartbeat_interval_ms=3_000,
        )
        await consumer.start()
        self.consumer = consumer
        expected = await self._wait_for_topics(consumer)
        self.projector.progress.expected = expected
        consumer.subscribe(list(self.topics), listener=_Rebalance(self))

    async def on_stop(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
        if self.consumer is not None:
            async with self.batch_lock:
                if self._committing is not None:
                    await asyncio.wait([self._committing], timeout=10)
                await self.consumer.stop()
            self.consumer = None

    async def _wait_for_topics(self, consumer: AIOKafkaConsumer) -> set[PositionKey]:
        """The event topics are cdc's (it creates them): wait for them, never create them."""
        warned = False
        while True:
            # aiokafka has no public call for another topic's partitions before subscribing
            cluster = await consumer._client.fetch_all_metadata()
            found = {t: cluster.partitions_for_topic(t) for t in self.topics}
            missing = [t for t, parts in found.items() if not parts]
            if not missing:
                return {(t, p) for t, parts in found.items() for p in parts or ()}
            if not warned:
                log.warning(
                    "%s: waiting for topic(s) %s on %s; cdc creates them (python -m cdc run)",
                    self.projector.name, ", ".join(missing), self.bootstrap,
                )  # fmt: skip
                warned = True
            await asyncio.sleep(1.0)

    async def seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        """Resume every assigned partition where the sink's positions say (the truth), not where Kafka says."""
        consumer = self.consumer
        assert consumer is not None
        self.epoch += 1
        keys = [(tp.topic, tp.partition) for tp in assigned]
        stored = await self.projector.resume(keys)
        for tp in assigned:
            pos = stored.get((tp.topic, tp.partition))
            committed = await consumer.committed(tp)
            if pos is None:
                await consumer.seek_to_beginning(tp)
                if committed:
                    log.warning(
                        "%s: %s[%d] has committed offset %d but the store has no position for "
                        "it (a new namespace/database?); reading it from the beginning",
                        self.projector.name, tp.topic, tp.partition, committed,
                    )  # fmt: skip
                continue
            consumer.seek(tp, pos.offset)
            if committed is not None and committed > pos.offset:
                log.warning(
                    "%s: %s[%d] committed offset %d is ahead of the store's position %d; "
                    "resuming at the store's (the events in between are applied again)",
                    self.projector.name, tp.topic, tp.partition, committed, pos.offset,
                )  # fmt: skip
        self.ready.set()

    async def take(self) -> list[RecordLike]:
        """Up to batch_max records: waits for the first, then at most batch_wait_s for more."""
        consumer = self.consumer
        assert consumer is not None
        records: list[RecordLike] = []
        deadline: float | None = None
        want = self.batch_max
        while len(records) < want and not self.should_stop:
            if deadline is None:
                timeout = 1.0
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            got = await consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=want - len(records)
            )
            for batch in got.values():
                records.extend(batch)
            if records and deadline is None:
                deadline = time.monotonic() + self.batch_wait_s
            elif not records and not got:
                return records
        return records

    async def _next_batch(self) -> Batch | None:
        """Read and prepare the next batch (None if there is none), tagged with the epoch it
        was read in: _run drops it if a seek came in between."""
        epoch = self.epoch
        try:
            records = await self.take()
        except KafkaError as exc:
            log.error("%s: Kafka fetch failed (%s); retrying", self.projector.name, exc)
            await asyncio.sleep(1.0)
            return None
        consumer = self.consumer
        if not records or consumer is None:
            return None
        mine = consumer.assignment()
        fetched = {(r.topic, r.partition) for r in records}
        if any(TopicPartition(t, p) not in mine for t, p in fetched):  # revoked meanwhile
            records = [r for r in records if TopicPartition(r.topic, r.partition) in mine]
        if not records:
            return None
        batch = await self.projector.prepare(records)
        batch.epoch = epoch
        return batch

    @Service.task
    async def _run(self) -> None:
        # start once the first assignment has sought to the store's positions
        await self.wait_for_stopped(self.ready.wait())
        while not self.should_stop:
            if self.consumer is None:
                await self.sleep(0.1)
                continue
            ahead, self._ahead = self._ahead, None
            batch = await (ahead if ahead is not None else self._next_batch())
            if batch is None:
                continue
            async with self.batch_lock:
                if self.consumer is None:
                    continue
                if batch.epoch != self.epoch:
                    # A seek while it was read: whether its records came from before or
                    # after it, the store's positions say where to go on from.
                    await self.seek_to_stored(self.consumer.assignment())
                    continue
                # The next batch is read, decoded and digested while this one is
                # applied (the store works meanwhile, and Python is free).
                self._ahead = asyncio.ensure_future(self._next_batch())
                offsets = await self.projector.commit(batch)
                # The commit overlaps the next batch (one in flight, in order): the store's
                # positions are already written, so it only reports progress to Kafka.
                if self._committing is not None:
                    await self._committing
                self._committing = asyncio.ensure_future(self._commit(offsets))

    async def _commit(self, offsets: dict[PositionKey, int]) -> None:
        consumer = self.consumer
        assert consumer is not None
        mine = consumer.assignment()
        commit = {
            tp: off for (t, p), off in offsets.items() if (tp := TopicPartition(t, p)) in mine
        }
        if not commit:
            return
        try:
            # bounded: a rebalance waiting for this batch must not wait on this commit forever
            await asyncio.wait_for(consumer.commit(commit), 10.0)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            # harmless: the store's positions are where the next assignment resumes
            log.warning(
                "%s: offset commit failed (%s); the store's positions stand",
                self.projector.name,
                exc,
            )
        lag = 0
        for tp in mine:
            high = consumer.highwater(tp)
            pos = self.projector.progress.applied.get((tp.topic, tp.partition))
            if high is not None and pos is not None:
                lag += max(0, high - pos.offset)
        self.projector.progress.set_offset_lag(lag)
        self.projector.metrics.offset_lag.labels(self.projector.name).set(lag)

    @Service.timer(1.0)
    async def _refresh_foreign(self) -> None:
        """Partitions other workers own (ClickHouse server mode): their progress comes from the store."""
        consumer = self.consumer
        progress = self.projector.progress
        if consumer is None or not progress.expected:
            return
        mine = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        foreign = progress.expected - mine
        if not foreign:
            return
        try:
            stored = await self.projector.sink.positions()
        except Exception:
            return
        progress.record_applied({k: v for k, v in stored.items() if k in foreign}, {})


class LivePipeline(Protocol):
    """A projection's live pipeline as the API, rebuilds and snapshots see it: a Pipeline
    in this process (ClickHouse) or one in a process of its own (Redis: RedisProcess)."""

    @property
    def progress(self) -> Progress: ...

    @property
    def running(self) -> bool: ...

    def paused(self) -> AbstractAsyncContextManager[None]: ...

    async def reseek(self, *, clear: bool = False) -> None: ...


@dataclass(slots=True)
class Runtime:
    """Everything the worker runs: the settings, sinks, pipelines, metrics, dead letters.

    ``redis`` serves the API's reads; the Redis pipeline writes through a client
    of its own in its own process (projections/redis_process.py)."""

    settings: Settings
    metrics: ProjectionMetrics
    dlq: DeadLetterQueue
    redis: RedisAdapter
    # None when this worker does not run the ClickHouse projection (PROJECTIONS): its
    # store is not opened (an embedded one is another worker's)
    clickhouse: ClickHouseAdapter | None
    # the projections this worker runs (settings.projections), by name
    pipelines: dict[str, LivePipeline]

    def progress(self, name: str) -> Progress:
        return self.pipelines[name].progress

    def render_metrics(self) -> bytes:
        """This process's metrics and the Redis process's (it reports them every second)."""
        from projections.redis_process import RedisProcess

        return self.metrics.render(
            *(p.metrics_text for p in self.pipelines.values() if isinstance(p, RedisProcess))
        )

    def not_run(self, name: str) -> str | None:
        """Why this worker cannot serve the projection `name`, or None when it runs it."""
        if name in self.pipelines:
            return None
        return (
            f"this worker does not run the {name} projection "
            f"(PROJECTIONS={','.join(self.settings.projections)}); ask a worker that does"
        )

    async def close(self) -> None:
        await self.dlq.stop()
        await self.redis.close()
        if self.clickhouse is not None:
            await self.clickhouse.close()


def build_runtime(settings: Settings, *, log_level: str = "info", json_logs: bool = False) -> Runtime:
    """The sinks and pipelines of the projections the worker runs (settings.projections):
    ClickHouse in this process, Redis in a child process (its own interpreter lock: a
    ClickHouse batch never delays the Redis views)."""
    from projections.redis_process import RedisProcess

    metrics = ProjectionMetrics()
    dlq = DeadLetterQueue(settings.kafka_bootstrap, client_id=f"{settings.app_id}-dlq")
    # blocking pool: a burst of the worker's own calls (positions, rebuilds, snapshots) waits
    # for a connection instead of failing; the API's view reads have theirs (redis_reads.py)
    client = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=10
        )
    )
    redis_sink = RedisAdapter(client, settings.redis_namespace)
    pipelines: dict[str, LivePipeline] = {}
    if "redis" in settings.projections:
        pipelines["redis"] = RedisProcess(settings, log_level=log_level, json_logs=json_logs)
    ch_sink = None
    if "clickhouse" in settings.projections:
        try:
            ch_sink = ClickHouseAdapter(settings.clickhouse_url)
        except Exception as exc:
            raise RuntimeError(
                f"cannot open ClickHouse at {mask_url(settings.clickhouse_url)}: {exc}"
            ) from None
        pipelines["clickhouse"] = Pipeline(
            Projector(ch_sink, dlq, metrics),
            bootstrap=settings.kafka_bootstrap,
            group_id=f"{settings.app_id}.clickhouse",
            topics=settings.topics,
            batch_max=settings.clickhouse_batch_max,
            batch_wait_s=settings.clickhouse_batch_wait_ms / 1000,
        )
    return Runtime(settings, metrics, dlq, redis_sink, ch_sink, pipelines)


class _NoKafka(BootStrategy):
    """Faust's own consumer/producer stay off: the pipelines own their Kafka clients."""

    enable_kafka = False


class _App(faust.App):
    BootStrategy = _NoKafka


def build_app(settings: Settings, runtime: Runtime) -> faust.App:
    """The Faust app: worker lifecycle, web server (query API), pipelines as its services."""
    from projections.api import register_routes

    data_dir = settings.data_dir / settings.app_id
    data_dir.mkdir(parents=True, exist_ok=True)
    app = _App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        datadir=str(data_dir),
        web_enabled=True,
        web_bind=settings.api_host,
        web_host=settings.api_host,
        web_port=settings.api_port,
        web_in_thread=False,
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        autodiscover=False,
    )
    register_routes(app, runtime)

    @app.task  # type: ignore[untyped-decorator]
    async def _start_pipelines() -> None:
        if "redis" in runtime.pipelines:
            await runtime.redis.resolve()
        for pipeline in runtime.pipelines.values():
            await app.add_runtime_dependency(cast(Service, pipeline))

    return app
