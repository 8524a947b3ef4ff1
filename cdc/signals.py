"""The signal table: ops ask the running capture for something by inserting a
row (as Debezium does); the capture sees the insert in the stream, in commit
order with everything else. Today's signal: ``execute-snapshot``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from cdc.changes import RowChange

__all__ = ["SIGNAL_SCHEMA", "SIGNAL_TABLE", "Signal", "ensure_signal_table", "parse_signal", "send_snapshot_signal"]

SIGNAL_SCHEMA = "readside_cdc"
SIGNAL_TABLE = "signals"

_DDL = """
create schema if not exists readside_cdc;
create table if not exists readside_cdc.signals (
    id         text primary key,
    type       text not null,
    data       jsonb not null default '{}',
    created_at timestamptz not null default now()
);
create table if not exists readside_cdc.incremental_snapshots (
    request_id  text primary key,
    slot        text not null,
    tables      text[] not null,
    table_index int not null default 0,
    after_key   text[],
    chunks      bigint not null default 0,
    rows        bigint not null default 0,
    status      text not null default 'requested',
    error       text,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    finished_at timestamptz
);
"""


@dataclass(frozen=True, slots=True)
class Signal:
    id: str
    type: str
    data: dict[str, Any]


def ensure_signal_table(conn: psycopg.Connection[Any]) -> None:
    if conn.execute("select to_regclass('readside_cdc.incremental_snapshots')").fetchone() == (None,):
        conn.execute(_DDL)


def is_signal(change: RowChange) -> bool:
    return change.table == SIGNAL_TABLE and change.schema == SIGNAL_SCHEMA


def parse_signal(change: RowChange) -> Signal | None:
    """The signal an insert carries; None for other operations on the table."""
    if change.op != "c" or change.after is None:
        return None
    data = change.after.get("data")
    if isinstance(data, str):
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            data = {}
    return Signal(str(change.after.get("id")), str(change.after.get("type")), data if isinstance(data, dict) else {})


def send_snapshot_signal(conn: psycopg.Connection[Any], slot: str | None, tables: list[str]) -> str:
    """Ask the capture on ``slot`` (None: any capture reading this database) for an
    incremental snapshot of ``tables`` (empty: every published table)."""
    ensure_signal_table(conn)
    request = uuid.uuid4().hex[:12]
    conn.execute(
        "insert into readside_cdc.signals (id, type, data) values (%s, 'execute-snapshot', %s)",
        (request, orjson.dumps({"slot": slot, "tables": tables}).decode()),
    )
    return request
