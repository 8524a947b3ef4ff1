"""Re-snapshot while streaming: drives the chunks of an incremental snapshot
(cdc/incremental.py has the algorithm) next to the capture loop.

A request comes from the signal table (``python -m cdc snapshot --tables``) or
from a restart that finds the initial snapshot unfinished. Progress (table,
last key of the newest chunk whose reads Kafka acknowledged) is kept in
``readside_cdc.incremental_snapshots``, so a restart resumes from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdc.changes import RowChange
from cdc.config import Settings
from cdc.incremental import MARK_PREFIX, Mark, WindowTracker, encode_mark
from cdc.lsn import format_lsn
from cdc.slot import TableInfo
from cdc.snapshot import SnapshotReader

__all__ = ["ResnapshotRunner"]

log = logging.getLogger("cdc.snapshot")


@dataclass
class _Request:
    id: str
    tables: list[str]
    table_index: int = 0
    after_key: list[str] | None = None
    chunks: int = 0
    rows: int = 0


@dataclass
class _Chunk:
    mark_low: Mark
    mark_high: Mark
    rows: list[RowChange] = field(default_factory=list)
    last_key: list[str] | None = None
    reached_low: asyncio.Event = field(default_factory=asyncio.Event)
    reached_high: asyncio.Event = field(default_factory=asyncio.Event)
    high_commit_lsn: int = 0
    done_table: bool = False


class ResnapshotRunner:
    def __init__(self, settings: Settings, tables: dict[str, TableInfo], confirmed: Callable[[], int]) -> None:
        self.settings = settings
        self.tables = tables  # "schema.table" -> info
        self.confirmed = confirmed
        self.tracker = WindowTracker()
        self._chunks: dict[tuple[str, int], _Chunk] = {}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._progress: list[tuple[int, str, int, list[str] | None, int, int, bool]] = []
        self.failed: str | None = None
        self.session = uuid.uuid4().hex[:12]

    # ---- lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="resnapshot")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None:
            self._conn.close()

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.query_dsn(), autocommit=True)
        return self._conn

    async def resume_pending(self) -> None:
        """Requests of this slot that a restart interrupted."""
        rows = await asyncio.to_thread(
            lambda: self._db().execute(
                """select request_id, tables, table_index, after_key, chunks, rows
                     from readside_cdc.incremental_snapshots
                    where slot = %s and status in ('requested', 'running') order by created_at""",
                (self.settings.slot,),
            ).fetchall()
        )
        for r in rows:
            log.info("resuming incremental snapshot %s at table %d of %s", r[0], r[2], ",".join(r[1]))
            self._queue.put_nowait(_Request(r[0], list(r[1]), r[2], r[3], r[4], r[5]))

    async def request(self, request_id: str, tables: list[str]) -> None:
        """A new request (from a signal, or the unfinished initial snapshot)."""
        unknown = [t for t in tables if self._qualify(t) not in self.tables]
        qualified = [self._qualify(t) for t in tables if self._qualify(t) in self.tables]
        if unknown:
            log.warning("snapshot request %s: not published, skipped: %s", request_id, ", ".join(unknown))
        if not qualified:
            return

        def insert() -> bool:
            cur = self._db().execute(
                """insert into readside_cdc.incremental_snapshots (request_id, slot, tables, status)
                   values (%s, %s, %s, 'running') on conflict (request_id) do nothing""",
                (request_id, self.settings.slot, qualified),
            )
            return cur.rowcount == 1

        if await asyncio.to_thread(insert):
            log.info("incremental snapshot %s of %s requested", request_id, ", ".join(qualified))
            self._queue.put_nowait(_Request(request_id, qualified))

    def _qualify(self, table: str) -> str:
        return table if "." in table else f"{self.settings.schema}.{table}"

    # ---- hooks for the capture loop (hot path: keep them cheap)

    def on_change(self, change: RowChange) -> None:
        self.tracker.change(change)

    def on_mark(self, mark: Mark, commit_lsn: int, commit_ts_ms: int) -> list[RowChange]:
        """A watermark seen in the stream; returns the reads to publish now (high marks)."""
        chunk = self._chunks.get((mark.request, mark.chunk))
        if chunk is None or mark.session != self.session:
            return []  # written before a restart: its chunk is read again
        if mark.kind == "low":
            self.tracker.low(mark)
            chunk.reached_low.set()
            return []
        rows = self.tracker.high(mark, chunk.rows, commit_lsn, commit_ts_ms) or []
        chunk.high_commit_lsn = commit_lsn
        chunk.reached_high.set()
        del self._chunks[(mark.request, mark.chunk)]
        return rows

    def save_progress(self) -> None:
        """Record chunks whose reads Kafka acknowledged (called at status time)."""
        if not self._progress:
            return
        confirmed = self.confirmed()
        ready = [p for p in self._progress if p[0] <= confirmed]
        if not ready:
            return
        self._progress = [p for p in self._progress if p[0] > confirmed]
        _, request, index, key, chunks, rows, finished = ready[-1]
        try:
            self._db().execute(
                """update readside_cdc.incremental_snapshots
                      set table_index = %s, after_key = %s, chunks = %s, rows = %s, updated_at = now(),
                          status = case when %s then 'done' else status end,
                          finished_at = case when %s then now() else finished_at end
                    where request_id = %s""",
                (index, key, chunks, rows, finished, finished, request),
            )
        except psycopg.Error as exc:
            log.warning("could not record snapshot progress (%s); it is recorded with the next chunk", exc)
            self._progress[:0] = ready

    # ---- the driver

    async def _run(self) -> None:
        while True:
            req = await self._queue.get()
            try:
                await self._snapshot(req)
            except asyncio.CancelledError:
                raise
            except psycopg.OperationalError as exc:
                # the database blinked: carry on from the last chunk after a pause
                log.warning("incremental snapshot %s paused: %s; retrying in 5 s", req.id, " ".join(str(exc).split()))
                self.tracker.abandon(req.id)
                self._conn = None
                await asyncio.sleep(5)
                self._queue.put_nowait(req)
            except Exception as exc:  # a failed request must not stop the stream
                self.failed = f"incremental snapshot {req.id} failed: {exc}"
                log.error("%s", self.failed)
                self.tracker.abandon(req.id)
                try:
                    await asyncio.to_thread(
                        self._db().execute,
                        "update readside_cdc.incremental_snapshots set status = 'failed', error = %s where request_id = %s",
                        (str(exc), req.id),
                    )
                except psycopg.Error:
                    pass  # the request stays 'running' and is resumed by the next session

    async def _snapshot(self, req: _Request) -> None:
        chunk_rows = self.settings.snapshot_chunk
        started = time.monotonic()
        while req.table_index < len(req.tables):
            name = req.tables[req.table_index]
            info = self.tables.get(name)
            if info is None:
                log.warning("snapshot %s: table %s is no longer published; skipped", req.id, name)
                req.table_index += 1
                req.after_key = None
                continue
            req.chunks += 1
            if not info.key:
                log.warning("snapshot %s: table %s has no primary key; it cannot be read in chunks, skipped", req.id, name)
                req.table_index += 1
                req.after_key = None
                continue
            low = Mark(req.id, req.chunks, "low", name, self.session)
            high = Mark(req.id, req.chunks, "high", name, self.session)
            chunk = _Chunk(low, high)
            self._chunks[(req.id, req.chunks)] = chunk
            self.tracker.expect(low, info.key or tuple())
            await asyncio.to_thread(self._emit, low)
            # read only once the stream has passed the low watermark: every transaction
            # committed before it is then long visible to the read
            await chunk.reached_low.wait()
            chunk.rows, chunk.last_key = await asyncio.to_thread(self._read, info, req.after_key, chunk_rows)
            await asyncio.to_thread(self._emit, high)
            await chunk.reached_high.wait()
            req.rows += len(chunk.rows)
            if len(chunk.rows) < chunk_rows or not info.key:
                req.table_index += 1
                req.after_key = None
            else:
                req.after_key = chunk.last_key
            finished = req.table_index >= len(req.tables)
            self._progress.append(
                (chunk.high_commit_lsn, req.id, req.table_index, req.after_key, req.chunks, req.rows, finished)
            )
        log.info(
            "incremental snapshot %s: %d rows of %s in %.1f s (done once Kafka acknowledged them, at %s)",
            req.id, req.rows, ", ".join(req.tables), time.monotonic() - started, format_lsn(chunk.high_commit_lsn),
        )

    def _emit(self, mark: Mark) -> None:
        self._db().execute("select pg_logical_emit_message(true, %s, %s)", (MARK_PREFIX, encode_mark(mark)))

    def _read(self, info: TableInfo, after: list[str] | None, size: int) -> tuple[list[RowChange], list[str] | None]:
        with psycopg.connect(self.settings.query_dsn()) as conn:
            reader = SnapshotReader(conn, None, 0, 0, size, kind="incremental")
            rows: list[RowChange] = []
            last: list[str] | None = None
            for part in reader.chunks(info, after, limit_chunks=1):
                rows = part
                last = reader.last_key
            reader.close()
        return rows, last
