"""The capture loop: walsender -> pgoutput -> row changes -> domain events -> Kafka,
with the LSN confirmed to Postgres only once Kafka acknowledged everything before it.

listener (cdc/replication.py) -> processor (cdc/transactions.py, cdc/mapping.py)
-> publisher (cdc/publisher.py) -> checkpointer (cdc/checkpointer.py): this
module only wires them together and owns the timing (status updates,
watermarks, backpressure, reconnects).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass

import psycopg

from cdc.changes import ChangeBuilder, RowChange
from cdc.checkpointer import Checkpointer, DeliveryFailed, Tx
from cdc.config import Settings, mask_dsn
from cdc.events import DomainEvent, encode_event, topic_for
from cdc.incremental import MARK_PREFIX, parse_mark
from cdc.lsn import format_lsn
from cdc.mapping import TransactionMapper
from cdc.metrics import CaptureMetrics
from cdc.pgoutput import PgOutputError, XLogData, parse_copy_data, standby_status_update
from cdc.publisher import KafkaUnavailable, Publisher, PublishError
from cdc.replication import ReplicationConnection, ReplicationError
from cdc.resnapshot import ResnapshotRunner
from cdc.rules import AGGREGATES
from cdc.signals import SIGNAL_TABLE, is_signal, parse_signal
from cdc.slot import SlotError, TableInfo, check_slot_usable, ensure_publication, read_slot
from cdc.snapshot import SnapshotReader
from cdc.snapshot_state import SnapshotState
from cdc.transactions import LogicalMessage, TransactionAssembler, TransactionEnd, TransactionStart

__all__ = ["Capture", "FatalCaptureError"]

log = logging.getLogger("cdc")

# what a restart cannot fix: say so and stop instead of retrying forever
FATAL = (SlotError, DeliveryFailed, PublishError, PgOutputError)


class FatalCaptureError(Exception):
    pass


@dataclass
class Progress:
    received_lsn: int = 0
    watermark_lsn: int = 0
    last_commit_ts_ms: int = 0
    events: int = 0
    changes: int = 0
    bytes: int = 0
    # what the metrics have been told so far (counters advance at status time, off the hot path)
    reported: tuple[int, int, int] = (0, 0, 0)


class Capture:
    def __init__(self, settings: Settings, metrics: CaptureMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or CaptureMetrics(settings.slot)
        self.publisher: Publisher | None = None
        self.progress = Progress()
        self.stopping = asyncio.Event()
        self._topics: dict[str, str] = {}
        self._tables: dict[str, TableInfo] = {}
        self.resnapshot: ResnapshotRunner | None = None

    # ---- top level: retries around one session

    async def run(self) -> None:
        """Capture until stopped; reconnect with backoff after connection failures."""
        delay = 1.0
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                await self._session()
                return
            except FATAL as exc:
                raise FatalCaptureError(str(exc)) from None
            except psycopg.OperationalError as exc:
                text = _one_line(exc)
                if "authentication" in text or "permission denied" in text or "must be superuser" in text:
                    raise FatalCaptureError(f"Postgres refused the capture: {text}") from None
                delay = await self._backoff(exc, started, delay)
            except psycopg.Error as exc:  # privileges, a broken publication: not fixed by retrying
                raise FatalCaptureError(f"Postgres: {_one_line(exc)}") from None
            except (ReplicationError, KafkaUnavailable, OSError) as exc:
                delay = await self._backoff(exc, started, delay)

    async def _backoff(self, exc: BaseException, started: float, delay: float) -> float:
        """Log, wait (or stop), and return the next delay: 1 s doubling to 30 s."""
        self.metrics.errors.labels(slot=self.settings.slot, kind=type(exc).__name__).inc()
        if time.monotonic() - started > 60:
            delay = 1.0
        log.warning("capture interrupted: %s; reconnecting in %.0f s", _one_line(exc), delay)
        try:
            await asyncio.wait_for(self.stopping.wait(), delay * (0.8 + 0.4 * random.random()))
        except TimeoutError:
            pass
        return min(delay * 2, 30.0)

    def stop(self) -> None:
        self.stopping.set()

    # ---- one session: from connect to a failure or a stop

    async def _session(self) -> None:
        s = self.settings
        if self.publisher is None:
            self.publisher = Publisher(s.kafka_bootstrap, s.partitions)
        publisher = self.publisher
        await asyncio.to_thread(publisher.wait_ready, 30.0)
        await asyncio.to_thread(
            publisher.ensure_topics, [topic_for(a.name, s.topic_prefix) for a in AGGREGATES]
        )
        with psycopg.connect(s.query_dsn(), autocommit=True, connect_timeout=10) as sqlconn:
            tables, added = ensure_publication(sqlconn, s)
            state = SnapshotState(sqlconn, s.slot)
            slot = read_slot(sqlconn, s.slot)
            if slot is None and state.complete():
                raise SlotError(
                    f'slot "{s.slot}" is missing (was it dropped?), so the changes since it last '
                    f'confirmed cannot be read. Run "python -m cdc reset --yes" and then '
                    f'"python -m cdc run" to take a fresh snapshot, and rebuild the projections from it'
                )
            unfinished: list[str] = []
            if slot is not None:
                check_slot_usable(slot, s)
                if not state.complete() and s.snapshot_mode != "never":
                    # the exported snapshot died with the connection that made it; the
                    # tables it did not finish are read again as an incremental
                    # snapshot while streaming from the slot's consistent point
                    recorded = state.tables()
                    if recorded:
                        unfinished = [name for name, _, done in recorded if not done]
                    else:  # the slot was made but the snapshot never began
                        unfinished = [t.qualified for t in tables]
                    log.warning(
                        'slot "%s": the initial snapshot was interrupted; %s will be read as an '
                        "incremental snapshot while streaming", s.slot, ", ".join(unfinished) or "no table",
                    )
            if slot is not None and added and s.snapshot_mode != "never":
                # a table new to the publication: its existing rows were never read
                log.info("tables new to the publication get an incremental snapshot: %s", ", ".join(added))
                unfinished += [a for a in added if a not in unfinished]
        self._tables = {t.qualified: t for t in tables}
        repl = await ReplicationConnection.connect(s.replication_dsn())
        try:
            if slot is None:
                export = s.snapshot_mode != "never"
                info = await repl.create_slot(s.slot, export_snapshot=export)
                log.info('created slot "%s" at %s', s.slot, format_lsn(info.consistent_point))
                start_lsn = info.consistent_point
                if export:
                    assert info.snapshot_name is not None
                    if not await self._initial_snapshot(info.snapshot_name, info.consistent_point, tables):
                        return
                else:
                    with psycopg.connect(s.query_dsn(), autocommit=True) as sqlconn:
                        SnapshotState(sqlconn, s.slot).finish(info.consistent_point)
                if s.snapshot_mode == "initial_only":
                    return
            else:
                assert slot.confirmed_flush is not None
                start_lsn = slot.confirmed_flush
                if s.snapshot_mode == "initial_only" and not unfinished:
                    log.info("initial snapshot already taken; nothing to do in initial_only mode")
                    return
            await self._stream(repl, start_lsn, unfinished)
        finally:
            await repl.close()

    # ---- the initial snapshot

    async def _initial_snapshot(self, snapshot_name: str, lsn: int, tables: list[TableInfo]) -> bool:
        """Read every table inside the exported snapshot; False when stopped midway."""
        s = self.settings
        publisher = self.publisher
        assert publisher is not None
        mapper = TransactionMapper()
        ts_ms = int(time.time() * 1000)
        with psycopg.connect(s.query_dsn(), autocommit=True, connect_timeout=10) as stateconn, psycopg.connect(s.query_dsn(), connect_timeout=10) as conn:
            state = SnapshotState(stateconn, s.slot)
            state.start(lsn, [t.qualified for t in tables])
            reader = SnapshotReader(conn, snapshot_name, lsn, ts_ms, s.snapshot_chunk)
            for table in tables:
                if self.stopping.is_set():
                    return False
                estimate = reader.count(table)
                log.info("snapshot of %s: about %d rows", table.qualified, estimate)
                rows = 0
                for chunk in reader.chunks(table):
                    if self.stopping.is_set():
                        return False  # this table is read again (incrementally) on restart
                    for change in chunk:
                        self._publish(mapper.snapshot(change), None)
                    rows += len(chunk)
                    self.metrics.snapshot_rows.inc(len(chunk))
                    await self._drain(publisher, s.max_in_flight)
                # a table counts as done only once Kafka has all of it
                remaining = await asyncio.to_thread(publisher.flush, 300.0)
                if remaining:
                    raise KafkaUnavailable(f"{remaining} snapshot events not acknowledged by Kafka after 300 s")
                log.info("snapshot of %s: %d rows", table.qualified, rows)
                state.table_done(table.qualified, rows)
            reader.close()
        remaining = await asyncio.to_thread(publisher.flush, 300.0)
        if remaining:
            raise KafkaUnavailable(f"{remaining} snapshot events not acknowledged by Kafka after 300 s")
        with psycopg.connect(s.query_dsn(), autocommit=True) as stateconn:
            SnapshotState(stateconn, s.slot).finish(lsn)
        self.progress.watermark_lsn = max(self.progress.watermark_lsn, lsn)
        publisher.publish_watermark(lsn, int(time.time() * 1000))
        return True

    # ---- streaming

    async def _stream(self, repl: ReplicationConnection, start_lsn: int, unfinished: list[str]) -> None:
        s = self.settings
        publisher = self.publisher
        assert publisher is not None
        m = self.metrics
        assembler = TransactionAssembler(
            s.spool_dir / s.slot, ChangeBuilder({(t.schema, t.name): t.key for t in self._tables.values() if t.key})
        )
        mapper = TransactionMapper()
        ckpt = Checkpointer(start_lsn)
        progress = self.progress
        progress.watermark_lsn = max(progress.watermark_lsn, start_lsn)
        await repl.start(s.slot, start_lsn, s.publication)
        log.info('streaming from slot "%s" at %s', s.slot, format_lsn(start_lsn))
        m.confirmed_lsn.set(start_lsn)
        runner = self.resnapshot = ResnapshotRunner(s, self._tables, lambda: ckpt.confirmed)
        runner.start()
        await runner.resume_pending()
        if unfinished:
            await runner.request(f"initial-{uuid.uuid4().hex[:8]}", unfinished)
            await asyncio.to_thread(self._finish_initial, start_lsn)
        tracker = runner.tracker

        tx: Tx | None = None
        last_status = 0.0
        last_watermark = 0.0
        sent_watermark = -1
        watermark_every = s.watermark_every_ms / 1000
        wal_end = start_lsn
        try:
            while not self.stopping.is_set():
                batch = await repl.read(timeout=0.1)
                now = time.monotonic()
                reply_now = False
                if batch:
                    m.batch_size.observe(len(batch))
                for data in batch:
                    msg = parse_copy_data(data)
                    if msg.__class__ is XLogData:
                        for item in assembler.feed(msg.wal_start, msg.payload):
                            if item.__class__ is RowChange:
                                if item.table == SIGNAL_TABLE and is_signal(item):
                                    await self._signal(item, runner)
                                    continue
                                progress.changes += 1
                                if tracker.watching:
                                    tracker.change(item)
                                for event in mapper.add(item):
                                    self._publish(event, tx)
                                if progress.changes & 1023 == 0 and publisher.in_flight() > s.max_in_flight:
                                    # a replayed streamed transaction is one long loop: keep
                                    # memory bounded inside it too
                                    await self._drain(publisher, s.max_in_flight // 2, repl, ckpt)
                            elif item.__class__ is TransactionStart:
                                tx = ckpt.begin()
                                mapper.begin(item.commit_lsn, item.commit_ts_ms, item.xid)
                            elif item.__class__ is TransactionEnd:
                                for event in mapper.end():
                                    self._publish(event, tx)
                                assert tx is not None
                                ckpt.seal(tx, item.end_lsn)
                                tx = None
                                progress.watermark_lsn = max(progress.watermark_lsn, item.end_lsn)
                                progress.last_commit_ts_ms = item.commit_ts_ms
                                m.transactions.inc()
                            elif item.__class__ is LogicalMessage:
                                if item.prefix == MARK_PREFIX and item.transactional:
                                    mark = parse_mark(item.content)
                                    if mark is not None:
                                        for row in runner.on_mark(mark, item.commit_lsn, item.commit_ts_ms):
                                            self._publish(mapper.snapshot(row), tx)
                        if msg.wal_start > progress.received_lsn:
                            progress.received_lsn = msg.wal_start
                    else:  # primary keepalive
                        wal_end = msg.wal_end
                        if not assembler.in_transaction and not assembler.open_streams:
                            # everything up to wal_end has been received and queued
                            progress.watermark_lsn = max(progress.watermark_lsn, wal_end)
                            ckpt.confirmable()
                            ckpt.advance_idle(wal_end)
                        if wal_end > progress.received_lsn:
                            progress.received_lsn = wal_end
                        reply_now = reply_now or msg.reply_requested  # type: ignore[union-attr]

                publisher.poll(0)
                if publisher.error:
                    raise PublishError(publisher.error)
                if publisher.in_flight() > s.max_in_flight:
                    await self._drain(publisher, s.max_in_flight // 2, repl, ckpt)

                if (progress.watermark_lsn != sent_watermark and now - last_watermark >= watermark_every) or now - last_watermark >= s.watermark_interval_s:
                    publisher.publish_watermark(progress.watermark_lsn, int(time.time() * 1000))
                    sent_watermark = progress.watermark_lsn
                    last_watermark = now
                if reply_now or (not batch and now - last_status >= 0.02) or now - last_status >= s.status_interval_s:
                    # an empty read means we are idle: ask for a keepalive (reply
                    # requested) so wal_end, and with it the watermark, moves on. At most
                    # every 20 ms: a read comes back empty on any partial message, and a
                    # status per empty read was thousands a second under a steady trickle
                    await self._send_status(repl, ckpt, reply=not batch)
                    last_status = now
                if runner.failed:
                    log.error("%s; the stream goes on", runner.failed)
                    runner.failed = None
        finally:
            if self.stopping.is_set() and not assembler.in_transaction:
                # a clean stop: let Kafka take what is in flight and confirm it, so a
                # restart does not send it again
                try:
                    await asyncio.to_thread(publisher.flush, 10.0)
                    await self._send_status(repl, ckpt, reply=False)
                except (ReplicationError, DeliveryFailed):
                    pass
            assembler.close()
            await runner.stop()

    async def _signal(self, change: RowChange, runner: ResnapshotRunner) -> None:
        signal = parse_signal(change)
        if signal is None:
            return
        if signal.type != "execute-snapshot":
            log.warning("signal %s: unknown type %r, ignored", signal.id, signal.type)
            return
        if signal.data.get("slot") not in (None, self.settings.slot):
            return
        tables = signal.data.get("tables")
        if not isinstance(tables, list) or not tables:
            tables = list(self._tables)
        await runner.request(signal.id, [str(t) for t in tables])

    def _finish_initial(self, lsn: int) -> None:
        with psycopg.connect(self.settings.query_dsn(), autocommit=True) as conn:
            SnapshotState(conn, self.settings.slot).finish(lsn)

    async def _send_status(self, repl: ReplicationConnection, ckpt: Checkpointer, reply: bool) -> None:
        confirmed = ckpt.confirmable()
        if self.resnapshot is not None:
            self.resnapshot.save_progress()
        p = self.progress
        await repl.send(standby_status_update(max(p.received_lsn, confirmed), confirmed, confirmed, reply_requested=reply))
        m = self.metrics
        events, changes, nbytes = p.reported
        m.events.inc(p.events - events)
        m.changes.inc(p.changes - changes)
        m.bytes.inc(p.bytes - nbytes)
        p.reported = (p.events, p.changes, p.bytes)
        m.confirmed_lsn.set(confirmed)
        m.received_lsn.set(p.received_lsn)
        m.lag_bytes.set(max(0, p.received_lsn - confirmed))
        m.in_flight.set(self.publisher.in_flight() if self.publisher else 0)
        if ckpt.idle() or not p.last_commit_ts_ms:
            m.lag_seconds.set(0)
        else:
            m.lag_seconds.set(max(0.0, time.time() - p.last_commit_ts_ms / 1000))

    async def _drain(
        self,
        publisher: Publisher,
        below: int,
        repl: ReplicationConnection | None = None,
        ckpt: Checkpointer | None = None,
    ) -> None:
        """Backpressure: stop reading the slot until Kafka has taken the backlog below
        ``below``; keep the walsender's status updates going meanwhile so it does not
        time the connection out while Kafka is down."""
        last_status = time.monotonic()
        warned = False
        waited_since = time.monotonic()
        while publisher.in_flight() > below:
            await asyncio.to_thread(publisher.poll, 0.1)
            if publisher.error:
                raise PublishError(publisher.error)
            now = time.monotonic()
            if repl is not None and ckpt is not None and now - last_status >= self.settings.status_interval_s:
                await self._send_status(repl, ckpt, reply=False)
                last_status = now
            if not warned and now - waited_since > 10:
                log.warning(
                    "Kafka at %s is not taking messages (%d waiting); reading from the slot is paused, nothing is dropped",
                    publisher.bootstrap, publisher.in_flight(),
                )
                warned = True
            if self.stopping.is_set():
                return
        if warned:
            log.info("Kafka is taking messages again; reading from the slot resumes")

    def _publish(self, event: DomainEvent, tx: Tx | None) -> None:
        publisher = self.publisher
        assert publisher is not None
        topic = self._topics.get(event.aggregate_type)
        if topic is None:
            topic = topic_for(event.aggregate_type, self.settings.topic_prefix)
            publisher.ensure_topics([topic])
            self._topics[event.aggregate_type] = topic
        key, value = encode_event(event)
        ack = tx.ack if tx is not None else _ignore_ack
        if event.table_wide:
            for p in range(publisher.topics[topic]):
                publisher.publish_to(topic, p, key, value, ack)
                if tx is not None:
                    tx.sent()
        else:
            publisher.publish(topic, key, value, ack)
            if tx is not None:
                tx.sent()
        progress = self.progress
        progress.events += 1
        progress.bytes += len(value)


def _ignore_ack(err: object, msg: object = None) -> None:
    if err is not None:
        raise DeliveryFailed(str(err))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def describe_target(settings: Settings) -> str:
    return f"Postgres {mask_dsn(settings.pg_dsn)}, Kafka {settings.kafka_bootstrap}"
