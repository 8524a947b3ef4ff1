"""The worker's handle on the Redis pipeline's process (projections/redis_process.py), against
a real child process, real Kafka and real Redis: pauses queue like a lock, a child that dies
during a pause is not replaced before the pause ends, and the next command says so."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from cdc.lsn import format_lsn
from projections.config import Settings
from projections.redis_process import RedisProcess, RedisProcessError

from .conftest import EventTopics, ShopHistory


def _settings(prefix: str, namespace: str) -> Settings:
    base = Settings.from_env({})
    return Settings(
        kafka_bootstrap=base.kafka_bootstrap, redis_url=base.redis_url, clickhouse_url=base.clickhouse_url,
        api_host="127.0.0.1", api_port=1, api_token=None, topic_prefix=prefix, pg_dsn=base.pg_dsn,
        app_id=f"{prefix}-projections", redis_namespace=namespace,
    )  # fmt: skip


async def _until(check, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def started(event_topics: EventTopics, shop_history: ShopHistory, redis_namespace: str):  # type: ignore[no-untyped-def]
    events = shop_history.register(1) + shop_history.place(1, 1, lines=2)
    lsn = shop_history.lsn + 0x10000
    event_topics.publish(events, watermark=lsn)
    proc = RedisProcess(_settings(event_topics.prefix, redis_namespace), log_level="warning")
    await proc.start()
    try:
        await _until(lambda: proc.progress.watermark() == lsn)
        proc.expected_events = sum(e.aggregate_type in ("order", "customer") for e in events)
        yield proc, lsn
    finally:
        await proc.stop()


async def test_the_child_reports_its_progress_and_pauses_queue_like_a_lock(started) -> None:  # type: ignore[no-untyped-def]
    proc, lsn = started
    assert proc.running
    status = proc.progress.status()
    assert status["watermark"] == format_lsn(lsn) and status["events_applied"] == proc.expected_events, status
    assert len(status["partitions"]) == 12  # the order and customer topics only

    order: list[str] = []
    first_in = asyncio.Event()

    async def first() -> None:
        async with proc.paused():
            order.append("first in")
            first_in.set()
            await asyncio.sleep(0.5)
            order.append("first out")

    async def second() -> None:
        await first_in.wait()
        async with proc.paused():
            order.append("second in")
        order.append("second out")

    await asyncio.gather(first(), second())
    assert order == ["first in", "first out", "second in", "second out"]


async def test_a_child_that_dies_during_a_pause_is_replaced_only_after_it(started) -> None:  # type: ignore[no-untyped-def]
    proc, lsn = started
    assert proc.proc is not None
    old = proc.proc.pid
    with pytest.raises(RedisProcessError, match="not running"):
        async with proc.paused():
            os.kill(old, signal.SIGKILL)
            await _until(lambda: not proc.running)
            await asyncio.sleep(1.5)  # past the first restart delay: still no new child
            assert proc.proc is None or proc.proc.pid == old
            await proc.reseek()  # a restore would fail here, not go on unpaused
    # the pause is over: a new child starts and reads on from the stored positions
    await _until(lambda: proc.running and proc.proc is not None and proc.proc.pid != old)
    await _until(lambda: proc.progress.watermark() == lsn)
    assert proc.progress.events >= proc.expected_events  # the counts add up over restarts


async def test_a_command_the_child_does_not_answer_is_logged_while_it_waits(
    started, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A stuck child (here stopped with SIGSTOP) makes a rebuild's or a restore's pause wait;
    the wait is never silent, and the command completes once the child answers."""
    import projections.redis_process as rp

    proc, _ = started
    monkeypatch.setattr(rp, "_CALL_WARN_S", 0.2)
    assert proc.proc is not None
    pid = proc.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        call = asyncio.ensure_future(proc.reseek())
        await _until(lambda: "has not answered 'reseek'" in caplog.text, timeout=10)
        assert not call.done()
        assert f"pid {pid}" in caplog.text
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.wait_for(call, 30)
    assert proc.running and proc.proc is not None and proc.proc.pid == pid
