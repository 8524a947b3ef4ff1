"""Fixtures for cdc tests: a ``cdc_test`` database of our own on the local Postgres.

Shared by the cdc test modules: keep this to the database and generic helpers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.lsn import parse_lsn

PG_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")
CDC_TEST_DB = "cdc_test"


def _dsn_for(dbname: str) -> str:
    params = conninfo_to_dict(PG_DSN)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def cdc_test_dsn() -> str:
    """DSN of the ``cdc_test`` database, created on first use (wal_level=logical cluster)."""
    try:
        with psycopg.connect(_dsn_for("postgres"), autocommit=True, connect_timeout=5) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (CDC_TEST_DB,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(CDC_TEST_DB)))
    except psycopg.OperationalError as e:
        pytest.fail(f"Postgres at {PG_DSN} is not reachable ({e}); run `make up` first")
    return _dsn_for(CDC_TEST_DB)


@pytest.fixture
def cdc_conn(cdc_test_dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to ``cdc_test``."""
    with psycopg.connect(cdc_test_dsn, autocommit=True) as conn:
        yield conn


def unique_name(prefix: str) -> str:
    """A name no other test (or engineer) uses: for tables, slots, publications."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@dataclass
class LogicalSlot:
    """A pgoutput slot plus publication in ``cdc_test``, read through the SQL interface."""

    conn: psycopg.Connection
    slot: str
    publication: str
    options: dict[str, str] = field(default_factory=dict)

    def _read(self, func: str, session: dict[str, str] | None) -> list[tuple[int, bytes]]:
        opts = {
            "proto_version": "2",
            "publication_names": self.publication,
            "messages": "true",
            "streaming": "on",
            **self.options,
        }
        args = sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(k), sql.Literal(v)) for k, v in opts.items()
        )
        query = sql.SQL("SELECT lsn::text, data FROM {}({}, NULL, NULL, {})").format(
            sql.Identifier(func), sql.Literal(self.slot), args
        )
        with self.conn.transaction():
            for name, value in (session or {}).items():
                self.conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            rows = self.conn.execute(query).fetchall()
        return [(parse_lsn(lsn), bytes(data)) for lsn, data in rows]

    def peek(self, **session: str) -> list[tuple[int, bytes]]:
        """Raw pgoutput messages (with their LSN) since the slot's position, not consumed.

        Keyword arguments are session settings for the decoding session, e.g.
        ``logical_decoding_work_mem='64kB'`` or ``TimeZone='UTC'``.
        """
        return self._read("pg_logical_slot_peek_binary_changes", session)

    def get(self, **session: str) -> list[tuple[int, bytes]]:
        """Like peek, but consumes what it returns."""
        return self._read("pg_logical_slot_get_binary_changes", session)


@contextlib.contextmanager
def open_logical_slot(
    dsn: str, tables: list[str] | None = None, **options: str
) -> Iterator[LogicalSlot]:
    """A pgoutput slot and a publication of ``tables`` ("schema.table" or "table"; None: all
    tables), with unique names; both dropped on exit."""
    slot = unique_name("dec_slot")
    pub = unique_name("dec_pub")
    with psycopg.connect(dsn, autocommit=True) as conn:
        target = (
            sql.SQL("FOR TABLE {}").format(
                sql.SQL(", ").join(sql.Identifier(*t.split(".")) for t in tables)
            )
            if tables
            else sql.SQL("FOR ALL TABLES")
        )
        conn.execute(sql.SQL("CREATE PUBLICATION {} {}").format(sql.Identifier(pub), target))
        try:
            conn.execute("SET statement_timeout = '120s'")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            try:
                yield LogicalSlot(conn, slot, pub, dict(options))
            finally:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        finally:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pub)))


@pytest.fixture
def open_slot(cdc_test_dsn: str) -> Callable[..., contextlib.AbstractContextManager[LogicalSlot]]:
    """``with open_slot(tables, **options) as slot:`` - open_logical_slot bound to ``cdc_test``."""

    def opener(
        tables: list[str] | None = None, **options: str
    ) -> contextlib.AbstractContextManager[LogicalSlot]:
        return open_logical_slot(cdc_test_dsn, tables, **options)

    return opener


@pytest.fixture
def logical_slot(cdc_test_dsn: str) -> Iterator[Callable[..., LogicalSlot]]:
    """Factory: ``logical_slot(tables, **options)`` -> LogicalSlot; dropped at teardown."""
    with contextlib.ExitStack() as stack:

        def make(tables: list[str] | None = None, **options: str) -> LogicalSlot:
            return stack.enter_context(open_logical_slot(cdc_test_dsn, tables, **options))

        yield make


@pytest.fixture
def test_schema(cdc_conn: psycopg.Connection) -> Iterator[str]:
    """A fresh schema in ``cdc_test`` for one test's tables; dropped with them afterwards."""
    name = unique_name("dec")
    cdc_conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    cdc_conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
