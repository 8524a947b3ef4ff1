"""Upcasting: old event versions reach the sinks in the current shape, step by step."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cdc.events import decode_record, encode_event
from projections.upcasting import UPCASTERS, UpcastError, Upcasters


def _order_paid_v2_from_cdc(shop_history):  # type: ignore[no-untyped-def]
    shop_history.register(1)
    shop_history.place(10, 1, lines=2, price="12.50")
    events = shop_history.pay(10, payment_id=77)
    (paid,) = [e for e in events if e.event_type == "OrderPaid"]
    # exactly what cdc publishes today: decode it from the wire form
    event = decode_record(encode_event(paid)[1])
    assert event.event_version == 2
    return event


def _order_paid_v1(shop_history):  # type: ignore[no-untyped-def]
    """The same event as cdc published it before OrderPaid v2: payment fields flat."""
    v2 = _order_paid_v2_from_cdc(shop_history)
    data = {k: v for k, v in v2.data.items() if k != "payment"}
    data.update(v2.data["payment"] or dict.fromkeys(("payment_id", "amount", "method", "provider_ref")))
    return replace(v2, event_version=1, data=data)


def test_upcasting_v1_gives_exactly_what_cdc_publishes_as_v2(shop_history) -> None:  # type: ignore[no-untyped-def]
    v2 = _order_paid_v2_from_cdc(shop_history)
    v1 = replace(
        v2, event_version=1,
        data={**{k: v for k, v in v2.data.items() if k != "payment"}, **v2.data["payment"]},
    )  # fmt: skip
    assert UPCASTERS.upcast(v1) == v2


def test_order_paid_v1_from_cdc_is_upcast_to_v2_with_the_payment_nested(shop_history) -> None:  # type: ignore[no-untyped-def]
    v1 = _order_paid_v1(shop_history)
    v2 = UPCASTERS.upcast(v1)
    assert v2.event_version == 2 == UPCASTERS.current("OrderPaid")
    assert v2.data["payment"] == {
        "payment_id": 77,
        "amount": "25.00",
        "method": "card",
        "provider_ref": "7f1c2a4e-0000-4000-8000-000000000000",
    }
    for flat in ("payment_id", "amount", "method", "provider_ref"):
        assert flat not in v2.data
    assert v2.data["total"] == "25.00" and v2.data["status"] == "paid"
    # everything but the version and data is untouched: ids, versions, row changes
    assert (v2.event_id, v2.version, v2.changes) == (v1.event_id, v1.version, v1.changes)
    assert v1.data["payment_id"] == 77  # the original is not modified


def test_order_paid_without_capture_row_gets_a_null_payment(shop_history) -> None:  # type: ignore[no-untyped-def]
    v1 = _order_paid_v1(shop_history)
    bare = replace(
        v1,
        data={**v1.data, "payment_id": None, "amount": None, "method": None, "provider_ref": None},
    )
    assert UPCASTERS.upcast(bare).data["payment"] is None


def test_an_event_already_current_is_returned_as_is(shop_history) -> None:  # type: ignore[no-untyped-def]
    shop_history.register(1)
    (event,) = shop_history.place(10, 1)
    assert UPCASTERS.upcast(event) is event


def test_a_version_newer_than_known_is_refused_with_what_to_do(shop_history) -> None:  # type: ignore[no-untyped-def]
    v1 = _order_paid_v1(shop_history)
    with pytest.raises(UpcastError, match=r"OrderPaid event_version 9 is unknown here .*up to v2"):
        UPCASTERS.upcast(replace(v1, event_version=9))


def test_steps_chain_one_version_at_a_time(shop_history) -> None:  # type: ignore[no-untyped-def]
    registry = Upcasters({"OrderShipped": 1})
    seen: list[int] = []

    @registry.register("OrderShipped", 1)
    def _v2(data, event):  # type: ignore[no-untyped-def]
        seen.append(1)
        return {**data, "carrier": None}

    @registry.register("OrderShipped", 2)
    def _v3(data, event):  # type: ignore[no-untyped-def]
        seen.append(2)
        return {**data, "carrier": data["carrier"] or "unknown"}

    shop_history.register(1)
    shop_history.place(10, 1)
    shop_history.pay(10, 1)
    (shipped,) = [e for e in shop_history.ship(10) if e.event_type == "OrderShipped"]
    out = registry.upcast(shipped)
    assert out.event_version == 3 and out.data["carrier"] == "unknown" and seen == [1, 2]


def test_a_gap_in_the_chain_names_the_missing_step(shop_history) -> None:  # type: ignore[no-untyped-def]
    registry = Upcasters({"OrderShipped": 1})
    registry.register("OrderShipped", 2)(lambda data, event: data)
    shop_history.register(1)
    shop_history.place(10, 1)
    shop_history.pay(10, 1)
    (shipped,) = [e for e in shop_history.ship(10) if e.event_type == "OrderShipped"]
    with pytest.raises(UpcastError, match="no upcaster from OrderShipped v1 to v2"):
        registry.upcast(shipped)


def test_a_failing_step_becomes_an_upcast_error(shop_history) -> None:  # type: ignore[no-untyped-def]
    v1 = _order_paid_v1(shop_history)
    broken = replace(v1, data=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(UpcastError, match="upcasting OrderPaid v1 -> v2 failed"):
        UPCASTERS.upcast(broken)
