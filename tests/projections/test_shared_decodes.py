"""SharedDecodes: both pipelines read the same records; the follower takes what the leader decoded."""

from __future__ import annotations

from projections.app import SharedDecodes

P0, P1 = ("t", 0), ("t", 1)


def _shared(limit: int = 4) -> SharedDecodes:
    shared = SharedDecodes(readers=2, limit=limit)
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


def test_a_reader_too_far_behind_decodes_its_own() -> None:
    shared = SharedDecodes(readers=2, limit=4)
    shared.assign("redis", [P0])
    shared.assign("clickhouse", [P0])
    for offset in range(10):
        shared.put("clickhouse", P0, offset, (offset, None))
    assert [shared.take("redis", P0, o) is not None for o in range(6)] == [True] * 4 + [False] * 2
