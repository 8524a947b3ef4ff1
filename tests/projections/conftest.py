"""Fixtures shared by the projections tests: keep this to generic ones.

Redis: the local stack's server (REDIS_URL); every test works under a unique
key namespace and deletes it afterwards, so tests (and engineers) never
collide and db 0 is never flushed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:56379/0")


async def delete_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key under ``{namespace}:`` (SCAN, never FLUSHDB)."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.Redis]:
    """A redis.asyncio client (bytes replies) on the local Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except redis.ConnectionError as e:
        await client.aclose()
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({e}); run `make up` first")
    yield client
    await client.aclose()


@pytest.fixture
async def redis_namespace(redis_client: redis.Redis) -> AsyncIterator[str]:
    """A key namespace of this test's own ("test:<uuid>"), deleted at teardown."""
    namespace = f"test:{uuid.uuid4().hex}"
    yield namespace
    await delete_namespace(redis_client, namespace)


# ---- ClickHouse (embedded chdb) ---------------------------------------------------
# chdb opens one data directory per process (and holds a lock on it), so the
# whole test run shares one, in a temp directory; every test works in a
# database of its own (clickhouse_database) and drops it afterwards.


@pytest.fixture(scope="session")
def chdb_backend(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The embedded ClickHouse of this test process (projections.clickhouse_backend.ChdbBackend)."""
    from projections.clickhouse_backend import open_backend

    backend = open_backend(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    yield backend
    backend.close()


@pytest.fixture
def clickhouse_database(chdb_backend):  # type: ignore[no-untyped-def]
    """A ClickHouse database name of this test's own ("t_<uuid>"), dropped at teardown."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    chdb_backend.command(f"DROP DATABASE IF EXISTS {name} SYNC")
