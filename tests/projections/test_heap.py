"""The cyclic collector is kept off large decoded batches, which reference counting still frees,
and the garbage cycles a freeze catches are reclaimed."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from cdc.events import encode_event
from projections.app import Projector, Record, RedisAdapter
from projections.dlq import DeadLetterQueue
from projections.heap import HEAP, BatchHeap
from projections.metrics import ProjectionMetrics

from .conftest import KAFKA_BOOTSTRAP


class Node:
    """A weakly referenceable object, to see when it is freed."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def _restore_collector():  # type: ignore[no-untyped-def]
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable() if enabled else gc.disable()


def test_a_large_batch_decodes_with_the_collector_off_and_is_frozen_after() -> None:
    heap = BatchHeap(min_records=10, reclaim_every=1000)
    gc.enable()
    with heap.decoding(10):
        assert not gc.isenabled()
        batch = [{"row": [i, {"n": i}]} for i in range(1000)]
    assert gc.isenabled() and heap.freezes == 1
    # out of the collector's generations (get_objects() leaves the permanent one out)
    tracked = {id(o) for o in gc.get_objects()}
    assert id(batch) not in tracked and id(batch[0]) not in tracked
    assert gc.get_count()[0] < 100  # the freeze emptied the young generation


def test_small_batches_and_a_collector_someone_else_turned_off_are_left_alone() -> None:
    heap = BatchHeap(min_records=10)
    gc.enable()
    with heap.decoding(9):
        assert gc.isenabled()
        small = [{"x": [i]} for i in range(100)]
    assert heap.freezes == 0 and id(small) in {id(o) for o in gc.get_objects()}
    gc.disable()
    with heap.decoding(100):
        pass
    assert not gc.isenabled() and heap.freezes == 0


def test_the_collector_is_back_on_when_a_decode_fails() -> None:
    heap = BatchHeap(min_records=1)
    gc.enable()
    with pytest.raises(RuntimeError), heap.decoding(5):
        raise RuntimeError("decode failed")
    assert gc.isenabled() and heap.freezes == 1


def test_overlapping_windows_freeze_once_when_the_last_closes() -> None:
    heap = BatchHeap(min_records=1)
    gc.enable()
    with heap.decoding(5):
        with heap.decoding(5):
            pass
        assert not gc.isenabled(), "the outer batch is still decoding"
        with heap.decoding(0):  # a small one meanwhile changes nothing either
            pass
        assert not gc.isenabled()
    assert gc.isenabled() and heap.freezes == 1


def _frozen_cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: reference counting never frees it
    return weakref.ref(a)


def test_garbage_cycles_caught_by_freezes_are_reclaimed_after_n_of_them() -> None:
    heap = BatchHeap(min_records=1, reclaim_every=3)
    gc.enable()
    with heap.decoding(1):
        cycle = _frozen_cycle()
    gc.collect()
    assert cycle() is not None, "a frozen cycle is out of the collector's reach"
    for _ in range(2):
        with heap.decoding(1):
            pass
    assert cycle() is not None and heap.reclaims == 0
    with heap.decoding(1):  # three freezes pending: this window starts with a reclaim
        assert heap.reclaims == 1
    assert cycle() is None


def test_a_small_batch_after_freezes_reclaims_at_most_once_a_settle_time() -> None:
    heap = BatchHeap(min_records=10, reclaim_every=1000, settle_s=0.3)
    gc.enable()
    with heap.decoding(10):
        cycle = _frozen_cycle()
    with heap.decoding(3):  # caught up, but the last reclaim (creation) was just now
        pass
    assert heap.reclaims == 0 and cycle() is not None
    time.sleep(0.3)
    with heap.decoding(3):  # caught up and settled: nothing stays frozen
        pass
    assert heap.reclaims == 1 and cycle() is None
    time.sleep(0.3)
    with heap.decoding(3):  # nothing pending: no more full collections
        pass
    assert heap.reclaims == 1


async def test_the_projector_decodes_a_large_batch_off_the_collector(
    redis_client, redis_namespace, shop_history, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(HEAP, "min_records", 200)
    monkeypatch.setattr(HEAP, "settle_s", 0.0)
    events = shop_history.register(1)
    for order in range(HEAP.min_records):
        events += shop_history.place(100 + order, 1)
    records = [
        Record(f"t.{e.aggregate_type}.events", 0, i, *encode_event(e)) for i, e in enumerate(events)
    ]
    dlq = DeadLetterQueue(KAFKA_BOOTSTRAP)
    try:
        projector = Projector(RedisAdapter(redis_client, redis_namespace), dlq, ProjectionMetrics())
        gc.enable()
        freezes = HEAP.freezes
        reclaims = HEAP.reclaims
        batch = await projector.prepare(records)
        assert len(batch.events) == len(events)
        assert HEAP.freezes == freezes + 1 and gc.isenabled()
        small = await projector.prepare(records[:10])
        assert HEAP.freezes == freezes + 1 and len(small.events) == 10
        assert HEAP.reclaims == reclaims + 1  # the small batch after a freeze
    finally:
        await dlq.stop()
