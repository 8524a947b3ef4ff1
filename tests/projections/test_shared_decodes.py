"""SharedDecodes: both pipelines read the same records; each is decoded once, and the leader waits."""

from __future__ import annotations

import asyncio
import time

from projections.app import SharedDecodes

P0, P1 = ("t", 0), ("t", 1)


def _shared(limit: int = 4, stall_s: float = 0.3) -> SharedDecodes:
    shared = SharedDecodes(readers=2, limit=limit, stall_s=stall_s)
    shared.assign("redis", [P0, P1])
    shared.assign("clickhouse", [P0, P1])
    return shared


def test_the_follower_takes_what_the_leader_decoded_and_nothing_else() -> None:
    shared = _shared()
    for offset in range(3):
        assert shared.take("clickhouse", P0, offset) is None
        shared.put("clickhouse", P0, offset, (f"event {offset}", None))
    assert [shared.take("redis", P0, o) for o in range(3)] == [
        ("event 0", None),
        ("event 1", None),
        ("event 2", None),
    ]
    # taken once: a second reader of the same offset decodes for itself
    assert shared.take("redis", P0, 2) is None


def test_records_the_follower_skipped_are_dropped_and_a_passed_offset_is_not_kept() -> None:
    shared = _shared()
    for offset in range(4):
        shared.put("clickhouse", P0, offset, (offset, None))
    assert shared.take("redis", P0, 2) == (2, None)  # 0 and 1 were skipped (a seek): gone
    assert shared.take("redis", P0, 0) is None
    # the follower is at 3 on P0: a decoding of offset 1 is of no use to it
    shared.put("clickhouse", P0, 1, ("late", None))
    assert shared.take("redis", P0, 1) is None


def test_a_partition_the_other_does_not_own_is_not_kept() -> None:
    shared = SharedDecodes(readers=2)
    shared.assign("redis", [P0])
    shared.assign("clickhouse", [P0, P1])
    shared.put("clickhouse", P1, 0, ("x", None))
    shared.assign("redis", [P0, P1])  # a new assignment starts the cache over
    assert shared.take("redis", P1, 0) is None


async def test_the_leader_waits_while_the_follower_keeps_taking() -> None:
    shared = _shared(limit=4, stall_s=5.0)
    for offset in range(4):
        shared.put("clickhouse", P0, offset, (offset, None))
    shared.take("redis", P0, 0)  # the follower is alive
    shared.put("clickhouse", P0, 4, (4, None))
    waiting = asyncio.ensure_future(shared.pace("clickhouse"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # 4 records ahead: the leader waits
    await shared.pace("redis")  # the follower never waits
    for offset in range(1, 4):
        shared.take("redis", P0, offset)
    await asyncio.wait_for(waiting, 1.0)


async def test_the_leader_goes_on_alone_when_the_follower_stalls() -> None:
    shared = _shared(limit=4, stall_s=0.2)
    for offset in range(6):
        shared.put("clickhouse", P0, offset, (offset, None))
    started = time.monotonic()
    await asyncio.wait_for(shared.pace("clickhouse"), 2.0)
    assert time.monotonic() - started < 1.0
    # and it stops leaving records at twice the limit: the follower decodes its own
    for offset in range(6, 20):
        shared.put("clickhouse", P0, offset, (offset, None))
    assert shared.take("redis", P0, 19) is None
