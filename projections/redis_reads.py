"""The query API's Redis reads: one EVALSHA on a connection of their own.

A GET /users/{id} is one script call. Through redis-py's client it went
through a Script object, the retry wrapper, the blocking pool's lock and
timeout and a deprecation shim: measured, that was a quarter of the
request's CPU in the worker, twice the send and the parse themselves. This
keeps idle connections in a list instead: a read takes one (or makes one,
up to `limit` at once; more wait), sends, parses, and puts it back.

Failures a user meets:
- a connection Redis closed while it sat idle: the read is sent once more
  on a new connection;
- a script Redis no longer has (SCRIPT FLUSH): it is loaded and the read
  sent again. A Redis restart does both: reconnect, load, read;
- Redis down or stalled: redis-py's ConnectionError (or TimeoutError, after
  the socket timeout), as through the client; reads waiting for one of the
  `limit` connections give up after SLOT_WAIT_S, as redis-py's pool did.
A read that fails or is cancelled half-way closes its connection: no reply
is ever left behind on a connection that goes back to the list. At close()
(the worker stopping) the idle connections are closed, and a read still in
flight closes its own when it ends.
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

# how long a read waits for one of the `limit` connections before it fails (redis-py's
# blocking pool, which the reads used before, waited as long)
SLOT_WAIT_S = 10.0


class ReadConnections:
    """Idle connections made like the client's (URL, auth, db, TLS) for script reads."""

    def __init__(self, client: redis.Redis, limit: int = 64) -> None:
        self._pool = client.connection_pool
        self._idle: list[AbstractConnection] = []
        self._limit = limit
        self._slots = asyncio.Semaphore(limit)
        self._closed = False

    async def evalsha(self, script: AsyncScript, *args: str) -> Any:
        """The script's reply for ARGV `args` (no keys)."""
        try:
            if self._slots.locked():
                async with asyncio.timeout(SLOT_WAIT_S):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()  # free: returns at once, no timer needed
        except TimeoutError:
            # as redis-py's blocking pool said, after as long: Redis is stalled or gone
            raise RedisConnectionError(
                f"No connection available: all {self._limit} of the API's Redis read "
                f"connections stayed busy for {SLOT_WAIT_S:g} s (is Redis stalled or unreachable?)"
            ) from None
        try:
            conn = self._idle.pop() if self._idle else self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                reply = await self._call(conn, script, args)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            if self._closed:  # a read that was in flight at close(): nothing keeps its connection
                with contextlib.suppress(Exception):  # the read itself succeeded
                    await conn.disconnect(nowait=True)
            else:
                self._idle.append(conn)
            return reply
        finally:
            self._slots.release()

    @staticmethod
    async def _call(conn: AbstractConnection, script: AsyncScript, args: tuple[str, ...]) -> Any:
        """EVALSHA; at most one reconnect and one SCRIPT LOAD on the way (a restart needs both)."""
        reconnected = load_first = loaded = False
        while True:
            try:
                if load_first:
                    await conn.send_command("SCRIPT", "LOAD", script.script)
                    await conn.read_response()
                    load_first, loaded = False, True
                await conn.send_command("EVALSHA", script.sha, 0, *args)
                return await conn.read_response()
            except NoScriptError:
                if loaded:
                    raise
                load_first = True
            except RedisConnectionError:
                if reconnected:
                    raise
                reconnected = True
                await conn.disconnect(nowait=True)  # the next send connects afresh

    async def close(self) -> None:
        """Close the idle connections, and those of reads in flight as each ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()
