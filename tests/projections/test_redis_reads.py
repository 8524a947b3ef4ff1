"""projections/redis_reads.py: the query API's script reads, on a real Redis of the tests' own
(SCRIPT FLUSH, restarts and slow scripts there disturb no one else's Redis)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError

from projections.redis_reads import ReadConnections

# ARGV[1] .. ':' .. ARGV[2], after a busy loop of ARGV[3] iterations (a slow read)
ECHO = """
local x = 0
for i = 1, tonumber(ARGV[3] or '0') do x = x + i end
return ARGV[1] .. ':' .. ARGV[2]
"""


class PrivateRedis:
    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on the PATH; `make up` installs it")
        self.binary = binary
        self.tmp = tmp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(private_redis: PrivateRedis) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(private_redis.url)
    yield c
    await c.aclose()


@pytest.fixture
async def reads(client: redis.Redis) -> AsyncIterator[ReadConnections]:
    r = ReadConnections(client)
    yield r
    await r.close()


def _script(client: redis.Redis) -> Any:
    """ECHO under a text of its own: never in the script cache yet."""
    return client.register_script(f"{ECHO}-- {uuid.uuid4().hex}")


async def _client_id(reads: ReadConnections) -> int:
    [conn] = reads._idle
    await conn.send_command("CLIENT", "ID")
    return int(await conn.read_response())


def _signal_reading(conn: Any) -> asyncio.Event:
    """An event set when the connection starts reading a reply (its command is sent)."""
    reading = asyncio.Event()
    read_response = conn.read_response

    async def signalled(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        return await read_response(*args, **kwargs)

    conn.read_response = signalled
    return reading


async def test_a_read_answers_like_the_script_through_the_client(client: redis.Redis) -> None:
    script = _script(client)
    reads = ReadConnections(client)
    try:
        assert await reads.evalsha(script, "ns", "42") == b"ns:42"  # NOSCRIPT first: loaded, then read
        assert await script(args=["ns", "42"]) == b"ns:42"
        assert await reads.evalsha(script, "ns", "43") == b"ns:43"
        assert len(reads._idle) == 1  # one connection, reused
    finally:
        await reads.close()
    assert reads._idle == []


async def test_a_script_redis_lost_is_loaded_again(client: redis.Redis, reads: ReadConnections) -> None:
    script = _script(client)
    assert await reads.evalsha(script, "a", "1") == b"a:1"
    await client.script_flush()
    assert await reads.evalsha(script, "a", "2") == b"a:2"


async def test_a_connection_redis_closed_while_idle_is_replaced(client: redis.Redis, reads: ReadConnections) -> None:
    script = _script(client)
    await reads.evalsha(script, "a", "1")
    old = await _client_id(reads)
    assert await client.client_kill_filter(_id=str(old)) == 1
    assert await reads.evalsha(script, "a", "2") == b"a:2"
    assert await _client_id(reads) != old


async def test_a_redis_restart_costs_no_read(private_redis: PrivateRedis, client: redis.Redis, reads: ReadConnections) -> None:
    """A restart closes every idle connection and empties the script cache: each idle
    connection reconnects, loads the script and reads, and none of the reads fails."""
    script = _script(client)
    first = await asyncio.gather(*(reads.evalsha(script, "r", str(i), "200000") for i in range(3)))
    assert first == [b"r:0", b"r:1", b"r:2"] and len(reads._idle) == 3
    private_redis.stop()
    private_redis.start()
    again = [await reads.evalsha(script, "s", str(i)) for i in range(4)]
    assert again == [b"s:0", b"s:1", b"s:2", b"s:3"]


async def test_a_cancelled_read_leaves_no_reply_behind(client: redis.Redis, reads: ReadConnections) -> None:
    script = _script(client)
    await reads.evalsha(script, "warm", "0")
    [conn] = reads._idle
    reading = _signal_reading(conn)
    slow = asyncio.create_task(reads.evalsha(script, "slow", "1", "20000000"))
    await reading.wait()  # the EVALSHA is sent; its reply is some 100 ms away
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert reads._idle == []  # the connection with the slow reply pending was closed
    assert await reads.evalsha(script, "next", "2") == b"next:2"  # not "slow:1"


async def test_a_read_in_flight_at_close_closes_its_connection_when_it_ends(client: redis.Redis) -> None:
    script = _script(client)
    reads = ReadConnections(client)
    await reads.evalsha(script, "warm", "0")
    [conn] = reads._idle
    reading = _signal_reading(conn)
    slow = asyncio.create_task(reads.evalsha(script, "slow", "1", "20000000"))
    await reading.wait()
    await reads.close()  # shutdown, with the read's reply still on its way
    assert await slow == b"slow:1"  # the read still gets its reply
    assert reads._idle == [] and not conn.is_connected  # and then its connection is closed


async def test_at_most_limit_connections_and_every_read_gets_its_own_reply(client: redis.Redis) -> None:
    script = _script(client)
    reads = ReadConnections(client, limit=3)
    try:
        replies = await asyncio.gather(*(reads.evalsha(script, "c", str(i), "20000") for i in range(40)))
        assert replies == [f"c:{i}".encode() for i in range(40)]
        assert 1 <= len(reads._idle) <= 3
    finally:
        await reads.close()


async def test_reads_waiting_for_a_connection_give_up_with_a_message(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from projections import redis_reads

    monkeypatch.setattr(redis_reads, "SLOT_WAIT_S", 0.05)
    script = _script(client)
    reads = ReadConnections(client, limit=1)
    try:
        slow = asyncio.create_task(reads.evalsha(script, "slow", "1", "50000000"))  # ~0.4 s
        await asyncio.sleep(0)
        with pytest.raises(RedisConnectionError, match=r"No connection available: all 1 of the API's Redis read connections stayed busy for 0.05 s"):
            await reads.evalsha(script, "queued", "2")
        assert await slow == b"slow:1"
    finally:
        await reads.close()


async def test_redis_down_is_redis_pys_connection_error(private_redis: PrivateRedis) -> None:
    private_redis.stop()
    client = redis.Redis.from_url(private_redis.url)
    reads = ReadConnections(client)
    try:
        with pytest.raises(RedisConnectionError):
            await reads.evalsha(_script(client), "a", "1")
        assert reads._idle == []
    finally:
        await reads.close()
        await client.aclose()
