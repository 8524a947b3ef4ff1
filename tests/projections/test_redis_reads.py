"""projections/redis_reads.py: the query API's script reads, on the real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError

from projections.redis_reads import ReadConnections

# ARGV[1] .. ARGV[2], after a busy loop of ARGV[3] iterations (a slow read, to cancel)
ECHO = """
local x = 0
for i = 1, tonumber(ARGV[3] or '0') do x = x + i end
return ARGV[1] .. ':' .. ARGV[2]
"""


async def _client_id(reads: ReadConnections) -> int:
    [conn] = reads._idle
    await conn.send_command("CLIENT", "ID")
    return int(await conn.read_response())


async def test_a_read_answers_like_the_script_through_the_client(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    reads = ReadConnections(redis_client)
    try:
        assert await reads.evalsha(script, "ns", "42") == await script(args=["ns", "42"]) == b"ns:42"
        assert await reads.evalsha(script, "ns", "43") == b"ns:43"
        assert len(reads._idle) == 1  # one connection, reused
    finally:
        await reads.close()
    assert reads._idle == []


async def test_a_script_redis_lost_is_loaded_again(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO + "-- lost " + str(id(redis_client)))
    reads = ReadConnections(redis_client)
    try:
        assert await reads.evalsha(script, "a", "1") == b"a:1"  # not loaded yet: NOSCRIPT, then loaded
        await redis_client.script_flush()
        assert await reads.evalsha(script, "a", "2") == b"a:2"
    finally:
        await reads.close()


async def test_a_connection_redis_closed_while_idle_is_replaced(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    reads = ReadConnections(redis_client)
    try:
        await reads.evalsha(script, "a", "1")
        old = await _client_id(reads)
        assert await redis_client.client_kill_filter(_id=old) == 1  # as a Redis restart would
        assert await reads.evalsha(script, "a", "2") == b"a:2"
        assert await _client_id(reads) != old
    finally:
        await reads.close()


async def test_a_cancelled_read_leaves_no_reply_behind(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    reads = ReadConnections(redis_client)
    try:
        await reads.evalsha(script, "warm", "0")
        slow = asyncio.create_task(reads.evalsha(script, "slow", "1", "20000000"))
        await asyncio.sleep(0.02)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert reads._idle == []  # the connection with the slow reply pending was closed
        assert await reads.evalsha(script, "next", "2") == b"next:2"  # not "slow:1"
    finally:
        await reads.close()


async def test_at_most_limit_connections_and_every_read_gets_its_own_reply(redis_client: redis.Redis) -> None:
    script = redis_client.register_script(ECHO)
    reads = ReadConnections(redis_client, limit=3)
    try:
        replies = await asyncio.gather(*(reads.evalsha(script, "c", str(i), "20000") for i in range(40)))
        assert replies == [f"c:{i}".encode() for i in range(40)]
        assert 1 <= len(reads._idle) <= 3
    finally:
        await reads.close()


async def test_redis_down_is_redis_pys_connection_error() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:9/0")  # nothing listens on port 9
    reads = ReadConnections(client)
    try:
        with pytest.raises(RedisConnectionError):
            await reads.evalsha(client.register_script(ECHO), "a", "1")
        assert reads._idle == []
    finally:
        await reads.close()
        await client.aclose()
