"""The query API's Redis reads: one EVALSHA on a connection of their own.

A GET /users/{id} is one script call. Through redis-py's client it went
through a Script object, the retry wrapper, the blocking pool's lock and
timeout and a deprecation shim: measured, that was a quarter of the
request's CPU in the worker, twice the send and the parse themselves. This
keeps idle connections in a list instead: a read takes one (or makes one,
up to `limit` at once; more wait), sends, parses, and puts it back.

Failures a user meets:
- a connection Redis closed while it sat idle (a Redis restart): the read
  is sent once more on a new connection;
- a script Redis no longer has (a restart, SCRIPT FLUSH): it is loaded and
  the read sent again;
- Redis down: redis-py's ConnectionError, as through the client.
A read that fails or is cancelled half-way closes its connection: no reply
is ever left behind on a connection that goes back to the list.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = ["ReadConnections"]


class ReadConnections:
    """Idle connections made like the client's (URL, auth, db, TLS) for script reads."""

    def __init__(self, client: redis.Redis, limit: int = 64) -> None:
        self._pool = client.connection_pool
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(limit)

    async def evalsha(self, script: AsyncScript, *args: str) -> Any:
        """The script's reply for ARGV `args` (no keys)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                reply = await self._call(conn, script, args)
            except BaseException:
                await conn.disconnect()
                raise
            self._idle.append(conn)
            return reply

    @staticmethod
    async def _call(conn: AbstractConnection, script: AsyncScript, args: tuple[str, ...]) -> Any:
        for attempt in (1, 2):
            try:
                await conn.send_command("EVALSHA", script.sha, 0, *args)
                return await conn.read_response()
            except NoScriptError:
                if attempt == 2:
                    raise
                await conn.send_command("SCRIPT", "LOAD", script.script)
                await conn.read_response()
            except RedisConnectionError:
                if attempt == 2:
                    raise
                await conn.disconnect()  # the next send connects afresh
        raise AssertionError("unreachable")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()
