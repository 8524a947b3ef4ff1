"""Publication and slot bookkeeping over an ordinary SQL connection.

The slot itself is created on the walsender connection (cdc/replication.py),
because only there can it export a snapshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from cdc.config import DEFAULT_FULL_IDENTITY, Settings
from cdc.lsn import parse_lsn
from cdc.signals import SIGNAL_SCHEMA, SIGNAL_TABLE, ensure_signal_table

__all__ = ["SlotError", "SlotState", "TableInfo", "drop_slot_and_publication", "ensure_publication", "published_tables", "read_slot", "table_infos"]


class SlotError(Exception):
    """The slot is missing, lost or unusable; the message says how to recover."""


@dataclass(frozen=True, slots=True)
class SlotState:
    name: str
    plugin: str
    active: bool
    confirmed_flush: int | None
    restart_lsn: int | None
    wal_status: str | None
    lag_bytes: int | None
    current_lsn: int


@dataclass(frozen=True, slots=True)
class TableInfo:
    schema: str
    name: str
    key: tuple[str, ...]  # the primary key (the replica identity index for REPLICA IDENTITY USING INDEX)
    replica_identity: str  # d(efault) n(othing) f(ull) i(ndex)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def usable_for_updates(self) -> bool:
        return self.replica_identity == "f" or bool(self.key)


def read_slot(conn: psycopg.Connection[tuple[object, ...]], slot: str) -> SlotState | None:
    row = conn.execute(
        """
        select slot_name, plugin, active, confirmed_flush_lsn::text, restart_lsn::text,
               wal_status, pg_current_wal_lsn()::text,
               (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
          from pg_replication_slots where slot_name = %s
        """,
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return SlotState(
        name=str(row[0]),
        plugin=str(row[1]),
        active=bool(row[2]),
        confirmed_flush=parse_lsn(str(row[3])) if row[3] else None,
        restart_lsn=parse_lsn(str(row[4])) if row[4] else None,
        wal_status=str(row[5]) if row[5] else None,
        current_lsn=parse_lsn(str(row[6])),
        lag_bytes=int(str(row[7])) if row[7] is not None else None,
    )


def check_slot_usable(state: SlotState, settings: Settings) -> None:
    if state.plugin != "pgoutput":
        raise SlotError(
            f'slot "{state.name}" uses the plugin {state.plugin}, not pgoutput; '
            f'choose another slot name (CDC_SLOT) or run "python -m cdc reset --yes" to start over'
        )
    if state.wal_status == "lost" or state.restart_lsn is None:
        raise SlotError(
            f'slot "{state.name}" was invalidated: the WAL it needed was removed '
            f"(max_slot_wal_keep_size exceeded), so changes since it last confirmed are gone. "
            f'Run "python -m cdc reset --yes" and then "python -m cdc run" to take a fresh '
            f"snapshot, and rebuild the projections from it"
        )


def table_infos(conn: psycopg.Connection[tuple[object, ...]], schema: str, names: tuple[str, ...]) -> list[TableInfo]:
    rows = conn.execute(
        """
        select n.nspname, c.relname, c.relreplident,
               coalesce((select array_agg(a.attname order by k.ord)
                  from pg_index i
                  cross join lateral unnest(i.indkey) with ordinality as k(attnum, ord)
                  join pg_attribute a on a.attrelid = c.oid and a.attnum = k.attnum
                 where i.indrelid = c.oid
                   and ((c.relreplident in ('d', 'f') and i.indisprimary)
                     or (c.relreplident = 'i' and i.indisreplident))), '{}')
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = %s and c.relkind in ('r', 'p')
           and (cardinality(%s::text[]) = 0 or c.relname = any(%s::text[]))
           and c.relname not like 'schema_migrations%%'
         order by c.relname
        """,
        (schema, list(names), list(names)),
    ).fetchall()
    return [TableInfo(str(r[0]), str(r[1]), tuple(str(k) for k in r[3] or ()), str(r[2])) for r in rows]  # type: ignore[attr-defined]


def ensure_publication(
    conn: psycopg.Connection[tuple[object, ...]], settings: Settings
) -> tuple[list[TableInfo], list[str]]:
    """Create (or extend) the publication over the configured tables; return them, and
    the ones just added to an existing publication (their rows need a snapshot).

    Tables whose updates/deletes could not be identified (no primary key and no
    REPLICA IDENTITY FULL/INDEX) are refused with a clear message, since
    Postgres would reject every UPDATE and DELETE on them once published.
    """
    tables = table_infos(conn, settings.schema, settings.tables)
    found = {t.name for t in tables}
    missing = [t for t in settings.tables if t not in found]
    if missing:
        raise SlotError(f"tables not found in schema {settings.schema}: {', '.join(missing)} (check CDC_TABLES)")
    if not tables:
        raise SlotError(f"no tables to publish in schema {settings.schema} (did you run the migrations?)")
    if settings.full_identity is None:
        full = [t.name for t in tables if t.name in DEFAULT_FULL_IDENTITY and t.replica_identity != "f"]
    else:
        full = [t.name for t in tables if t.name in settings.full_identity and t.replica_identity != "f"]
        for name in settings.full_identity:
            if name not in found:
                raise SlotError(f"CDC_FULL_IDENTITY names {name}, which is not a published table")
    for name in full:
        conn.execute(sql.SQL("alter table {} replica identity full").format(sql.Identifier(settings.schema, name)))
    if full:
        tables = table_infos(conn, settings.schema, settings.tables)
    unusable = [t.qualified for t in tables if not t.usable_for_updates]
    if unusable:
        raise SlotError(
            f"tables without a key usable for updates and deletes: {', '.join(unusable)}. "
            f"Give them a primary key, or request full before-images with "
            f"CDC_FULL_IDENTITY={','.join(t.split('.')[1] for t in unusable)} (REPLICA IDENTITY FULL), "
            f"or leave them out with CDC_TABLES"
        )
    ensure_signal_table(conn)
    pub = sql.Identifier(settings.publication)
    exists = conn.execute("select 1 from pg_publication where pubname = %s", (settings.publication,)).fetchone()
    idents = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
    signals = sql.Identifier(SIGNAL_SCHEMA, SIGNAL_TABLE)
    added: list[str] = []
    if not exists:
        conn.execute(sql.SQL("create publication {} for table {}, {}").format(pub, idents, signals))
    else:
        published = {
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                "select schemaname, tablename from pg_publication_tables where pubname = %s", (settings.publication,)
            ).fetchall()
        }
        new = [t for t in tables if (t.schema, t.name) not in published]
        added = [t.qualified for t in new]
        if (SIGNAL_SCHEMA, SIGNAL_TABLE) not in published:
            new.append(TableInfo(SIGNAL_SCHEMA, SIGNAL_TABLE, ("id",), "d"))
        if new:
            conn.execute(
                sql.SQL("alter publication {} add table {}").format(
                    pub, sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in new)
                )
            )
    return tables, added


def published_tables(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> list[TableInfo]:
    rows = conn.execute(
        "select schemaname, tablename from pg_publication_tables where pubname = %s and schemaname <> 'readside_cdc' order by 1, 2",
        (settings.publication,),
    ).fetchall()
    out: list[TableInfo] = []
    for schema in sorted({str(r[0]) for r in rows}):
        names = tuple(str(r[1]) for r in rows if r[0] == schema)
        out.extend(table_infos(conn, schema, names))
    return out


def drop_slot_and_publication(conn: psycopg.Connection[tuple[object, ...]], settings: Settings) -> list[str]:
    done: list[str] = []
    state = read_slot(conn, settings.slot)
    if state is not None:
        if state.active:
            pid = conn.execute(
                "select active_pid from pg_replication_slots where slot_name = %s", (settings.slot,)
            ).fetchone()
            if pid and pid[0]:
                conn.execute("select pg_terminate_backend(%s)", (pid[0],))
        for _ in range(50):
            try:
                conn.execute("select pg_drop_replication_slot(%s)", (settings.slot,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
        else:
            raise SlotError(f'slot "{settings.slot}" stays in use by another process; stop "python -m cdc run" first')
        done.append(f'dropped slot "{settings.slot}"')
    if conn.execute("select 1 from pg_publication where pubname = %s", (settings.publication,)).fetchone():
        conn.execute(sql.SQL("drop publication {}").format(sql.Identifier(settings.publication)))
        done.append(f'dropped publication "{settings.publication}"')
    return done
