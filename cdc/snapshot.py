"""Initial snapshot: existing rows read inside the slot's exported snapshot,
chunked by primary key, emitted as ``op=r`` row changes.

Rows are read in the server's text form (the same output functions pgoutput
uses, under the same TimeZone/DateStyle/IntervalStyle settings) and converted
by cdc/values.py, so a snapshot read and a streamed change of the same row
carry identical values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from cdc.changes import RowChange
from cdc.slot import TableInfo
from cdc.values import Converter, converter_for, raw_text

__all__ = ["SnapshotReader"]


class SnapshotReader:
    """Reads tables inside one snapshot: an exported one (initial) or the
    transaction's own (``snapshot_name=None``)."""

    def __init__(
        self,
        conn: psycopg.Connection[tuple[Any, ...]],
        snapshot_name: str | None,
        snapshot_lsn: int,
        ts_ms: int,
        chunk: int,
        kind: str = "initial",
    ) -> None:
        self.conn = conn
        self.snapshot_lsn = snapshot_lsn
        self.ts_ms = ts_ms
        self.chunk = chunk
        self.kind = kind
        self.last_key: list[str] | None = None
        self._type_names: dict[int, str | None] = {}
        conn.autocommit = False
        conn.execute("set transaction isolation level repeatable read, read only")
        if snapshot_name is not None:
            # the exported snapshot exists only while the walsender connection that
            # created the slot stays idle (Postgres docs, CREATE_REPLICATION_SLOT)
            conn.execute(sql.SQL("set transaction snapshot {}").format(sql.Literal(snapshot_name)))

    def close(self) -> None:
        self.conn.rollback()

    def _type_name(self, oid: int) -> str | None:
        """Names of user types (OIDs past the built-in range), as pgoutput's Type message
        gives them, so enum arrays convert the same in snapshots and in the stream."""
        if oid < 16384:
            return None
        if oid not in self._type_names:
            row = self.conn.execute("select typname from pg_type where oid = %s", (oid,)).fetchone()
            self._type_names[oid] = str(row[0]) if row else None
        return self._type_names[oid]

    def count(self, table: TableInfo) -> int:
        """Estimated rows (planner statistics): for progress only. reltuples is -1 until
        the table's first ANALYZE; the statistics collector's n_live_tup is kept from the start."""
        row = self.conn.execute(
            "select greatest(c.reltuples, s.n_live_tup, 0)::bigint from pg_class c"
            " left join pg_stat_user_tables s on s.relid = c.oid where c.oid = %s::regclass",
            (f'"{table.schema}"."{table.name}"',),
        ).fetchone()
        return int(row[0]) if row else 0

    def chunks(
        self,
        table: TableInfo,
        after_key: list[str] | None = None,
        limit_chunks: int | None = None,
        until_key: list[str] | None = None,
    ) -> Iterator[list[RowChange]]:
        """Yield the table's rows in key order, ``chunk`` rows at a time (keyset
        pagination: each chunk is one indexed range scan, whatever the table size),
        after ``after_key`` and up to ``until_key`` (included) when given.
        ``last_key`` holds the key (as text) of the newest row yielded."""
        ident = sql.Identifier(table.schema, table.name)
        if not table.key:
            yield from self._scan_without_key(table, ident)
            return
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
        holes = sql.SQL(", ").join(sql.Placeholder() * len(table.key))
        bound = sql.SQL(" and ({}) <= ({})").format(keys, holes) if until_key is not None else sql.SQL("")
        first = sql.SQL("select * from {} where true{} order by {} limit {}").format(
            ident, bound, keys, sql.Literal(self.chunk)
        )
        nxt = sql.SQL("select * from {} where ({}) > ({}){} order by {} limit {}").format(
            ident, keys, holes, bound, keys, sql.Literal(self.chunk)
        )
        until = list(until_key or [])
        last = after_key
        done = 0
        while limit_chunks is None or done < limit_chunks:
            cur = self.conn.execute(first, until) if last is None else self.conn.execute(nxt, [*last, *until])
            rows, last = self._changes(table, cur)
            self.last_key = last
            done += 1
            if rows:
                yield rows
            if len(rows) < self.chunk:
                return

    def _scan_without_key(self, table: TableInfo, ident: sql.Composable) -> Iterator[list[RowChange]]:
        with self.conn.cursor(name=f"snapshot_{table.name}") as cur:
            cur.itersize = self.chunk
            cur.execute(sql.SQL("select * from {}").format(ident))
            while True:
                cur.fetchmany(self.chunk)  # fills pgresult with the next chunk
                rows, _ = self._changes(table, cur)
                if not rows:
                    return
                yield rows

    def _changes(self, table: TableInfo, cur: psycopg.Cursor[Any]) -> tuple[list[RowChange], list[str] | None]:
        res = cur.pgresult
        if res is None or res.ntuples == 0:
            return [], None
        nfields = res.nfields
        names = [(res.fname(j) or b"").decode() for j in range(nfields)]
        convs: list[Converter] = [
            converter_for(res.ftype(j), res.fmod(j), self._type_name(res.ftype(j))) for j in range(nfields)
        ]
        key_index = [names.index(k) for k in table.key]
        get = res.get_value
        out: list[RowChange] = []
        lsn, ts, kind, key = self.snapshot_lsn, self.ts_ms, self.kind, table.key
        last_raw: list[Any] = []
        for i in range(res.ntuples):
            row: dict[str, Any] = {}
            unconverted: list[str] | None = None
            for j in range(nfields):
                raw = get(i, j)
                if raw is None:
                    row[names[j]] = None
                    continue
                try:
                    row[names[j]] = convs[j](raw)
                except Exception:  # kept as text and flagged, never lost
                    row[names[j]] = raw_text(raw)
                    unconverted = [*(unconverted or []), names[j]]
            out.append(
                RowChange("r", table.schema, table.name, key, None, row, (),
                          tuple(unconverted) if unconverted else (), lsn, lsn, 0, 0, ts, kind)
            )  # fmt: skip
            if i == res.ntuples - 1:
                last_raw = [get(i, k) for k in key_index]
        return out, [raw.decode() for raw in last_raw] if last_raw else None
