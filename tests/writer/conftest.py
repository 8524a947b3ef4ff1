"""A database of our own (writer_test), recreated and migrated once per session."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from writer import commands as c
from writer.db import Pool, default_dsn, open_pool
from writer.migrate import migrate

TEST_DB = "writer_test"

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


def _dsn_for(dbname: str) -> str:
    return make_conninfo(default_dsn(), dbname=dbname)


def recreate_database(dbname: str) -> str:
    """Drop and create ``dbname`` on the server of PG_DSN; its DSN."""
    admin = make_conninfo(default_dsn(), dbname="postgres")
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.exit(
            f"writer tests need Postgres ({conninfo_to_dict(admin).get('host')}): "
            f"{str(exc).splitlines()[0]}; run `make up`",
            returncode=2,
        )
    with conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    return _dsn_for(dbname)


@pytest.fixture(scope="session")
def dsn() -> Iterator[str]:
    test_dsn = recreate_database(TEST_DB)
    migrate(test_dsn)
    yield test_dsn


@pytest.fixture
def fresh_database() -> Iterator[Callable[[str], str]]:
    """Make an empty database (``writer_test_<suffix>``) for one test; dropped afterwards."""
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{TEST_DB}_{suffix}"
        made.append(name)
        return recreate_database(name)

    yield make
    admin = make_conninfo(default_dsn(), dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def pool(dsn: str) -> AsyncIterator[Pool]:
    """One pool for the session (tests using it run in the session's event loop)."""
    p = await open_pool(dsn, 4)
    try:
        yield p
    finally:
        await p.close()


_unique = itertools.count(1)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Distinct emails/SKUs across tests sharing the session database."""
    import os

    run = os.getpid()

    def make(prefix: str) -> str:
        return f"{prefix}{run}x{next(_unique)}"

    return make


@pytest_asyncio.fixture(loop_scope="session")
async def customer(pool: Pool, unique: Callable[[str], str]) -> int:
    result = await c.register_customer(pool, f"{unique('c')}@example.com", "Ada Lovelace")
    return result.id


@pytest.fixture
def make_product(pool: Pool, unique: Callable[[str], str]) -> Callable[..., Any]:
    async def make(price: str = "10.00", stock: int = 100, active: bool = True) -> int:
        result = await c.add_product(
            pool, unique("SKU-").upper(), "Teapot", "kitchen", price, stock=stock, active=active
        )
        return result.id

    return make


class Db:
    """Reads for assertions, on the pool under test."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def fetch(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, params or None)
            return await cur.fetchall()

    async def fetch_one(self, query: str, *params: Any) -> tuple[Any, ...]:
        rows = await self.fetch(query, *params)
        assert len(rows) == 1, rows
        return rows[0]

    async def value(self, query: str, *params: Any) -> Any:
        return (await self.fetch_one(query, *params))[0]

    async def state(self) -> tuple[Any, ...]:
        """Row count and newest row version of every table: any committed write changes it."""
        return await self.fetch_one(
            "SELECT "
            + ", ".join(
                f"(SELECT row(count(*), max(xmin::text::bigint))::text FROM {table})"
                for table in ("customers", "products", "orders", "order_items", "payments")
            )
        )


@pytest.fixture
def db(pool: Pool) -> Db:
    return Db(pool)


@pytest.fixture
def address() -> dict[str, str]:
    return dict(ADDRESS)
