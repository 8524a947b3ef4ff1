"""Dead letters: bad records go to <topic>.dlq with the error, the rest of the batch flows."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaConsumer

from cdc.events import encode_event
from projections.app import Projector, Record, RedisAdapter
from projections.dlq import DeadLetterQueue, dlq_topic
from projections.metrics import ProjectionMetrics

from .conftest import KAFKA_BOOTSTRAP


def _records(topic_prefix: str, events: list, start: int = 0) -> list[Record]:
    out = []
    for i, event in enumerate(events):
        key, value = encode_event(event)
        out.append(
            Record(f"{topic_prefix}.{event.aggregate_type}.events", 0, start + i, key, value)
        )
    return out


def _with_payment_amount(events: list, amount: str) -> list:
    """The events with their payments rows' amount set (a fraction of a cent: refused)."""
    return [
        replace(
            e,
            changes=[
                {**c, "after": {**c["after"], "amount": amount}}
                if c["source"]["table"] == "payments"
                else c
                for c in e.changes
            ],
        )
        for e in events
    ]


async def _read_letters(topic: str, expect: int, timeout: float = 20.0) -> list:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=KAFKA_BOOTSTRAP, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    letters: list = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(letters) < expect and asyncio.get_running_loop().time() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for batch in got.values():
                letters.extend(batch)
    finally:
        await consumer.stop()
    return letters


@pytest.fixture
async def dlq():  # type: ignore[no-untyped-def]
    queue = DeadLetterQueue(KAFKA_BOOTSTRAP)
    yield queue
    await queue.stop()


async def test_bad_records_are_dead_lettered_with_their_error_and_the_rest_is_applied(
    redis_client, redis_namespace, shop_history, dlq, event_topics
) -> None:  # type: ignore[no-untyped-def]
    prefix = event_topics.prefix
    projector = Projector(RedisAdapter(redis_client, redis_namespace), dlq, ProjectionMetrics())
    good = shop_history.register(1) + shop_history.place(10, 1) + shop_history.place(11, 1)
    paid_bad = _with_payment_amount(shop_history.pay(10, payment_id=5), "12.345")
    paid_good = shop_history.pay(11, payment_id=6)
    future = replace(shop_history.ship(11)[0], event_version=7)
    records = _records(prefix, good + paid_bad + paid_good + [future])
    order_topic = f"{prefix}.order.events"
    records.append(Record(order_topic, 0, len(records), b"99", b"{not json"))

    offsets = await projector.process(records)

    assert offsets[(order_topic, 0)] == len(records)
    views = projector.sink.views  # type: ignore[attr-defined]
    assert (await views.order("11"))["status"] == "paid"  # after the bad one, in the same batch
    assert (await views.order("10"))["status"] == "pending"  # its payment event was refused
    user = await views.user("1")
    assert user["order_counts"]["paid"] == 1 and user["order_counts"]["pending"] == 1
    stored = await views.positions()
    assert stored[(order_topic, 0)].offset == len(records)  # positions move past the dead letters

    letters = await _read_letters(dlq_topic(order_topic), 3)
    by_stage = {dict(m.headers)["dlq.stage"].decode(): m for m in letters}
    assert set(by_stage) == {"decode", "upcast", "apply"}
    apply = dict(by_stage["apply"].headers)
    assert b"12.345" in apply["dlq.error"] and apply["dlq.projection"] == b"redis"
    assert int(apply["dlq.attempts"]) == projector.attempts
    assert apply["dlq.source.topic"].decode() == order_topic
    original = records[len(good)]
    assert by_stage["apply"].value == original.value and by_stage["apply"].key == b"10"
    assert int(apply["dlq.source.offset"]) == original.offset
    upcast = dict(by_stage["upcast"].headers)
    assert b"event_version 7 is unknown" in upcast["dlq.error"]
    assert orjson.loads(by_stage["upcast"].value)["event_version"] == 7
    decode = dict(by_stage["decode"].headers)
    assert b"not JSON" in decode["dlq.error"] and by_stage["decode"].value == b"{not json"
    assert projector.progress.dead_letters == 3


async def test_an_outage_is_retried_and_never_dead_lettered(
    shop_history, dlq, event_topics
) -> None:  # type: ignore[no-untyped-def]
    from .conftest import free_port

    down = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    projector = Projector(
        RedisAdapter(down, f"test:{uuid.uuid4().hex}"), dlq, ProjectionMetrics(), max_backoff_s=0.2
    )
    records = _records(event_topics.prefix, shop_history.register(1) + shop_history.place(10, 1))
    task = asyncio.create_task(projector.process(records))
    await asyncio.sleep(2.0)
    assert not task.done()  # still retrying: the batch is neither applied nor skipped
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert projector.progress.dead_letters == 0
    assert projector.progress.applied == {}
    errors = projector.metrics.errors.labels("redis", "ConnectionError")._value.get()
    assert errors >= 2
    await down.aclose()


async def test_a_valid_batch_goes_through_in_one_apply(
    redis_client, redis_namespace, shop_history, dlq, event_topics
) -> None:  # type: ignore[no-untyped-def]
    sink = RedisAdapter(redis_client, redis_namespace)
    calls = []
    apply = sink.apply

    async def counting(events, positions, prepared=None):  # type: ignore[no-untyped-def]
        calls.append(len(events))
        await apply(events, positions, prepared)

    sink.apply = counting  # type: ignore[method-assign]
    projector = Projector(sink, dlq, ProjectionMetrics())
    events = shop_history.register(1) + shop_history.place(10, 1) + shop_history.pay(10, 1)
    await projector.process(_records(event_topics.prefix, events))
    assert calls == [len(events)]
    assert (await sink.views.order("10"))["status"] == "paid"


async def test_a_refused_event_leaves_no_cycle_holding_its_batch(
    redis_client, redis_namespace, shop_history, dlq, event_topics
) -> None:  # type: ignore[no-untyped-def]
    """Bisecting a batch keeps the error's text, not the exception: an exception's traceback
    holds the frames whose locals hold the batch, a cycle reference counting never frees
    (and a batch freeze, projections/heap.py, keeps from the collector until a reclaim)."""
    import gc
    import types

    projector = Projector(RedisAdapter(redis_client, redis_namespace), dlq, ProjectionMetrics())
    events = shop_history.register(1) + shop_history.place(10, 1)
    bad = _with_payment_amount(shop_history.pay(10, payment_id=5), "0.001")
    records = _records(event_topics.prefix, events + bad)
    was = gc.isenabled()
    gc.collect()
    gc.disable()  # what is left alive now is left by reference counting
    try:
        await projector.process(records)
        assert projector.progress.dead_letters == 1
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, types.FrameType) and o.f_code.co_name == "_isolate"
        ]
        assert left == [], "an _isolate frame outlived its call: something keeps it in a cycle"
    finally:
        if was:
            gc.enable()
