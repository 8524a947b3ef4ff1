"""Where the write model lives and how to reach it: DSN, masking, pool.

Connections are autocommit: the commands send their own BEGIN/COMMIT so that
a whole transaction (and the LSN read after its COMMIT) can go out in one
pipeline instead of one round trip per statement.
"""

from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from writer.errors import DatabaseUnavailable, MigrationError
from writer.statements import prepare

__all__ = [
    "DEFAULT_DSN",
    "Pool",
    "connect",
    "default_dsn",
    "describe_target",
    "mask_dsn",
    "open_pool",
]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:55432/shop"

Pool = AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]

_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def default_dsn() -> str:
    return os.environ.get("PG_DSN") or DEFAULT_DSN


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe to print."""
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", dsn))


def describe_target(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages (never includes the password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return mask_dsn(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "localhost")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or "")
    return f"{host}:{port}/{dbname}"


def unavailable(dsn: str, exc: psycopg.Error) -> DatabaseUnavailable:
    """Turn libpq's multi-line connection failure into one line that says what to do."""
    target = describe_target(dsn)
    detail = str(exc).strip()
    lowered = detail.lower()
    if "connection refused" in lowered or "no such file or directory" in lowered:
        hint = "is the local stack running? start it with `make up`"
        reason = "connection refused"
    elif "does not exist" in lowered and "database" in lowered:
        hint = "create it (`make up` creates shop) or set PG_DSN / --dsn to an existing one"
        reason = "database does not exist"
    elif "password" in lowered or "authentication" in lowered:
        hint = "check the user and password in PG_DSN / --dsn"
        reason = "login refused"
    elif "timeout" in lowered or "timed out" in lowered:
        hint = "check the host and port in PG_DSN / --dsn, and that `make up` succeeded"
        reason = "connection timed out"
    else:
        hint = "check PG_DSN / --dsn and `make status`"
        reason = mask_dsn(detail.splitlines()[-1] if detail else type(exc).__name__)
    return DatabaseUnavailable(f"cannot connect to Postgres at {target} ({reason}); {hint}")


async def connect(dsn: str, *, autocommit: bool = True) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """One connection, with connection failures turned into ``DatabaseUnavailable``."""
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=autocommit, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None


async def open_pool(dsn: str, size: int) -> Pool:
    """An open pool of ``size`` autocommit connections, the commands' statements prepared.

    A direct connection is tried first, statements prepared: a pool would keep
    retrying in the background and report only a timeout, hiding why it fails.
    """
    probe = await connect(dsn)
    try:
        await prepare(probe)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedObject) as exc:
        raise MigrationError(
            f"the shop schema is missing or out of date in {describe_target(dsn)}"
            f" ({exc.diag.message_primary}); run `python -m writer migrate` (or `make migrate`)"
        ) from None
    finally:
        await probe.close()
    pool: Pool = AsyncConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        # psycopg's own automatic preparing stays off: on any ROLLBACK it sends
        # DEALLOCATE ALL, which would also drop the statements prepared here.
        kwargs={"autocommit": True, "prepare_threshold": None},
        open=False,
        name="writer",
        configure=prepare,
        timeout=10,  # waiting longer for a connection only hides that the database is gone
    )
    await pool.open(wait=True, timeout=30)
    return pool
