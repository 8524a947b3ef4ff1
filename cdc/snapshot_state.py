"""Progress of a slot's initial snapshot, kept in the source database (schema
``readside_cdc``, outside every publication) so a restart knows whether the
snapshot finished."""

from __future__ import annotations

from typing import Any

import psycopg

from cdc.lsn import format_lsn

__all__ = ["SnapshotState"]

_DDL = """
create schema if not exists readside_cdc;
create table if not exists readside_cdc.snapshots (
    slot          text primary key,
    snapshot_lsn  pg_lsn not null,
    started_at    timestamptz not null default now(),
    finished_at   timestamptz
);
create table if not exists readside_cdc.snapshot_tables (
    slot        text not null references readside_cdc.snapshots (slot) on delete cascade,
    table_name  text not null,
    rows        bigint,
    finished_at timestamptz,
    primary key (slot, table_name)
);
"""


class SnapshotState:
    def __init__(self, conn: psycopg.Connection[Any], slot: str) -> None:
        self.conn = conn
        self.slot = slot
        if conn.execute("select to_regclass('readside_cdc.snapshot_tables')").fetchone() == (None,):
            conn.execute(_DDL)

    def complete(self) -> bool:
        row = self.conn.execute(
            "select finished_at is not null from readside_cdc.snapshots where slot = %s", (self.slot,)
        ).fetchone()
        return bool(row and row[0])

    def start(self, snapshot_lsn: int, tables: list[str]) -> None:
        with self.conn.transaction():
            self.conn.execute("delete from readside_cdc.snapshots where slot = %s", (self.slot,))
            self.conn.execute(
                "insert into readside_cdc.snapshots (slot, snapshot_lsn) values (%s, %s::pg_lsn)",
                (self.slot, format_lsn(snapshot_lsn)),
            )
            for t in tables:
                self.conn.execute(
                    "insert into readside_cdc.snapshot_tables (slot, table_name) values (%s, %s)", (self.slot, t)
                )

    def table_done(self, table: str, rows: int) -> None:
        self.conn.execute(
            "update readside_cdc.snapshot_tables set rows = %s, finished_at = now() where slot = %s and table_name = %s",
            (rows, self.slot, table),
        )

    def finish(self, snapshot_lsn: int) -> None:
        self.conn.execute(
            """
            insert into readside_cdc.snapshots (slot, snapshot_lsn, finished_at) values (%s, %s::pg_lsn, now())
            on conflict (slot) do update set finished_at = now()
            """,
            (self.slot, format_lsn(snapshot_lsn)),
        )

    def forget(self) -> None:
        self.conn.execute("delete from readside_cdc.snapshots where slot = %s", (self.slot,))

    def tables(self) -> list[tuple[str, int | None, bool]]:
        rows = self.conn.execute(
            "select table_name, rows, finished_at is not null from readside_cdc.snapshot_tables where slot = %s order by 1",
            (self.slot,),
        ).fetchall()
        return [(str(r[0]), r[1], bool(r[2])) for r in rows]
