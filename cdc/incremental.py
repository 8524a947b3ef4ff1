"""Incremental snapshots while streaming: the watermark algorithm of DBLog
(Netflix; Debezium's incremental snapshots use it too), sans-I/O.

For each chunk the capture writes a low watermark into the WAL
(``pg_logical_emit_message``), reads the chunk (the next rows by primary key),
then writes a high watermark. Reading the stream, every row of the chunk's
table changed between the two watermarks is dropped from the chunk: the
stream already carries a change at least as new as what the read saw. At the
high watermark the chunk's remaining rows are emitted as reads (``op=r``),
stamped with the high watermark's commit LSN, so they sort after every change
committed before it and before every change committed after it. The stream
never pauses and no row is left older than its latest change.

The capture also waits for the stream to reach the low watermark before it
reads the chunk, so every transaction committed before the low watermark has
long been visible to the read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from cdc.changes import RowChange

__all__ = ["MARK_PREFIX", "ChunkWindow", "Mark", "WindowTracker", "encode_mark", "parse_mark", "row_key"]

MARK_PREFIX = "readside.dblog"


@dataclass(frozen=True, slots=True)
class Mark:
    request: str
    chunk: int
    kind: str  # "low" | "high"
    table: str  # schema.table
    # the process that wrote it: after a restart the stream replays marks of the
    # previous session with the same request and chunk numbers; they must not count
    session: str = ""


def encode_mark(mark: Mark) -> str:
    return orjson.dumps(
        {"request": mark.request, "chunk": mark.chunk, "mark": mark.kind, "table": mark.table, "session": mark.session}
    ).decode()


def parse_mark(content: bytes) -> Mark | None:
    """A watermark message, or None for anything else under the prefix."""
    try:
        obj = orjson.loads(content)
        mark = Mark(str(obj["request"]), int(obj["chunk"]), str(obj["mark"]), str(obj["table"]), str(obj.get("session", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return mark if mark.kind in ("low", "high") else None


def row_key(change: RowChange, key: tuple[str, ...]) -> tuple[Any, ...] | None:
    image = change.after if change.after is not None else change.before
    if image is None:
        return None
    try:
        return tuple(image[k] for k in key)
    except KeyError:
        return None


@dataclass(slots=True)
class ChunkWindow:
    mark: Mark
    key: tuple[str, ...]
    changed: set[tuple[Any, ...]] = field(default_factory=set)
    truncated: bool = False


class WindowTracker:
    """Open chunk windows and the keys changed inside them."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], ChunkWindow] = {}
        self._by_table: dict[str, list[ChunkWindow]] = {}

    def expect(self, mark: Mark, key: tuple[str, ...]) -> None:
        """Register a chunk before its low watermark is written."""
        window = ChunkWindow(mark, key)
        self._open[(mark.request, mark.chunk)] = window

    def low(self, mark: Mark) -> bool:
        """The stream reached a low watermark: start watching its table. False for
        a mark this process did not write (a replay after a restart): ignored."""
        window = self._open.get((mark.request, mark.chunk))
        if window is None:
            return False
        self._by_table.setdefault(mark.table, []).append(window)
        return True

    @property
    def watching(self) -> bool:
        """Is any window open? (checked per change before calling ``change``)"""
        return bool(self._by_table)

    def change(self, change: RowChange) -> None:
        windows = self._by_table.get(f"{change.schema}.{change.table}")
        if not windows:
            return
        for window in windows:
            if change.op == "t":
                window.truncated = True
                continue
            k = row_key(change, window.key)
            if k is not None:
                window.changed.add(k)
            if change.op == "u" and change.before is not None and change.after is not None:
                old = row_key(replace(change, after=None), window.key)
                if old is not None:
                    window.changed.add(old)

    def high(self, mark: Mark, rows: list[RowChange], commit_lsn: int, commit_ts_ms: int) -> list[RowChange] | None:
        """The stream reached a high watermark: the chunk's rows that no change in
        the window superseded, stamped as reads at the watermark's commit. None for
        a mark this process did not write."""
        window = self._open.pop((mark.request, mark.chunk), None)
        if window is None:
            return None
        self._unwatch(window)
        if window.truncated:
            return []
        out: list[RowChange] = []
        changed = window.changed
        for row in rows:
            k = row_key(row, window.key)
            if k is not None and k in changed:
                continue
            out.append(replace(row, lsn=commit_lsn, commit_lsn=commit_lsn, commit_ts_ms=commit_ts_ms, snapshot="incremental"))
        return out

    def abandon(self, request: str) -> None:
        for key in [k for k in self._open if k[0] == request]:
            self._unwatch(self._open.pop(key))

    def _unwatch(self, window: ChunkWindow) -> None:
        table_windows = self._by_table.get(window.mark.table)
        if table_windows is not None and window in table_windows:
            table_windows.remove(window)
            if not table_windows:
                del self._by_table[window.mark.table]
