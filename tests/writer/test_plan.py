"""The load generator's command plan is a function of the seed and the worker only."""

from __future__ import annotations

import itertools
from collections import Counter

from writer.plan import (
    MIX,
    Cancel,
    Pay,
    PlaceOrder,
    Refund,
    Ship,
    plan,
    share,
    worker_plan,
)


def test_the_same_seed_gives_the_same_plan():
    assert plan(seed=7, workers=4, commands=2000) == plan(seed=7, workers=4, commands=2000)


def test_a_different_seed_gives_a_different_plan():
    assert plan(seed=7, workers=4, commands=500) != plan(seed=8, workers=4, commands=500)


def test_a_workers_stream_does_not_depend_on_the_number_of_workers():
    two = plan(seed=3, workers=2, commands=400)
    eight = plan(seed=3, workers=8, commands=1600)
    assert two[0] == eight[0]
    assert two[1] == eight[1]


def test_workers_get_different_streams():
    first, second = plan(seed=3, workers=2, commands=200)
    assert first != second


def test_the_plan_is_split_evenly_over_the_workers():
    sizes = [len(stream) for stream in plan(seed=1, workers=3, commands=10)]
    assert sizes == [4, 3, 3]
    assert sum(share(1001, 8, w) for w in range(8)) == 1001


def test_lifecycle_steps_only_refer_to_orders_in_the_right_state():
    """Simulated: pay a pending order, ship a paid one, cancel pending|paid, refund paid|shipped."""
    status: dict[int, str] = {}
    for command in itertools.islice(worker_plan(11, 0), 20_000):
        match command:
            case PlaceOrder():
                assert command.local not in status
                status[command.local] = "pending"
            case Pay():
                assert status[command.local] == "pending"
                status[command.local] = "paid"
            case Ship():
                assert status[command.local] == "paid"
                status[command.local] = "shipped"
            case Cancel():
                assert status[command.local] in ("pending", "paid")
                status[command.local] = "cancelled"
            case Refund():
                assert status[command.local] in ("paid", "shipped")
                status[command.local] = "refunded"


def test_the_mix_is_mostly_the_order_lifecycle():
    kinds = Counter(command.kind for command in itertools.islice(worker_plan(5, 0), 20_000))
    assert set(kinds) == set(MIX)
    lifecycle = sum(kinds[k] for k in ("place_order", "pay", "ship", "cancel", "refund"))
    assert lifecycle / 20_000 > 0.7
    assert kinds["register_customer"] > 0 and kinds["add_product"] > 0


def test_some_registrations_carry_a_bio_large_enough_to_be_toasted():
    bios = [
        len(command.bio)
        for command in itertools.islice(worker_plan(5, 0), 20_000)
        if command.kind == "register_customer"
    ]
    assert any(size > 2500 for size in bios)
    assert sum(size > 2500 for size in bios) < len(bios) / 2
