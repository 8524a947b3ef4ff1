"""The event envelope on the wire: encoding, decoding, ids and timestamps."""

from __future__ import annotations

import orjson
import pytest

from cdc.changes import RowChange
from cdc.events import (
    TABLE_WIDE_ID,
    DecodeError,
    DomainEvent,
    Watermark,
    decode_record,
    encode_event,
    encode_watermark,
    event_from_dict,
    format_occurred_at,
    snapshot_event_id,
    streamed_event_id,
    topic_for,
)

COMMIT = 0x16_B374_D848


def _event(**overrides: object) -> DomainEvent:
    change = RowChange(
        "c", "public", "customers", ("id",), None, {"id": 7, "email": "ä@example.com"},
        (), (), COMMIT - 8, COMMIT, 901, 0, 1_764_139_447_123, None,
    )  # fmt: skip
    fields: dict[str, object] = {
        "event_id": streamed_event_id(COMMIT, 0),
        "event_type": "CustomerRegistered",
        "event_version": 1,
        "aggregate_type": "customer",
        "aggregate_id": "7",
        "version": (COMMIT << 16) | 1,
        "occurred_at": format_occurred_at(1_764_139_447_123),
        "commit_lsn": COMMIT,
        "data": {"customer_id": 7, "email": "ä@example.com"},
        "changes": [change.envelope()],
    }
    fields.update(overrides)
    return DomainEvent(**fields)  # type: ignore[arg-type]


def test_key_is_the_aggregate_id_in_utf8() -> None:
    key, _ = encode_event(_event(aggregate_id="kø-1"))
    assert key == "kø-1".encode()


def test_value_round_trips_to_an_equal_event() -> None:
    event = _event()
    _, value = encode_event(event)
    assert decode_record(value) == event


def test_value_carries_commit_lsn_as_postgres_writes_it() -> None:
    _, value = encode_event(_event())
    assert orjson.loads(value)["commit_lsn"] == "16/B374D848"


def test_value_has_the_design_fields_and_to_dict_matches_it() -> None:
    event = _event()
    wire = orjson.loads(encode_event(event)[1])
    assert list(wire) == [
        "event_id", "event_type", "event_version", "aggregate_type", "aggregate_id",
        "version", "occurred_at", "commit_lsn", "data", "changes",
    ]  # fmt: skip
    assert wire == event.to_dict()


def test_change_envelopes_keep_the_debezium_shape() -> None:
    wire = orjson.loads(encode_event(_event())[1])
    (env,) = wire["changes"]
    assert env["op"] == "c"
    assert env["source"]["commit_lsn"] == "16/B374D848"
    assert env["source"]["table"] == "customers"


def test_watermark_record_has_the_design_shape() -> None:
    assert orjson.loads(encode_watermark(COMMIT, 1234)) == {
        "event_type": "Watermark",
        "lsn": "16/B374D848",
        "ts_ms": 1234,
    }


def test_watermark_decodes_to_a_watermark() -> None:
    assert decode_record(encode_watermark(COMMIT, 1234)) == Watermark(COMMIT, 1234)


def test_decoding_garbage_names_the_problem() -> None:
    with pytest.raises(DecodeError, match="not JSON"):
        decode_record(b"\x00\x01garbage")


def test_decoding_a_json_array_is_refused() -> None:
    with pytest.raises(DecodeError, match="expected an object"):
        decode_record(b"[1, 2]")


def test_decoding_an_event_with_a_missing_field_names_the_field() -> None:
    wire = _event().to_dict()
    del wire["version"]
    with pytest.raises(DecodeError, match="'version'"):
        event_from_dict(wire)


def test_decoding_an_event_with_a_bad_commit_lsn_names_it() -> None:
    wire = _event().to_dict()
    wire["commit_lsn"] = "nonsense"
    with pytest.raises(DecodeError, match="commit_lsn"):
        event_from_dict(wire)


def test_decoding_a_watermark_without_lsn_is_refused() -> None:
    with pytest.raises(DecodeError, match="Watermark"):
        decode_record(b'{"event_type": "Watermark", "ts_ms": 5}')


def test_occurred_at_is_utc_iso_with_milliseconds_and_z() -> None:
    assert format_occurred_at(1_764_139_447_123) == "2025-11-26T06:44:07.123Z"
    assert format_occurred_at(5) == "1970-01-01T00:00:00.005Z"


def test_streamed_and_snapshot_ids_cannot_collide() -> None:
    streamed = streamed_event_id(COMMIT, 3)
    snapshot = snapshot_event_id(COMMIT, "public", "orders", [3])
    assert streamed == "16/B374D848:3"
    assert snapshot == "16/B374D848:r:public.orders:[3]"
    assert streamed != snapshot


def test_snapshot_ids_of_composite_text_keys_are_unambiguous() -> None:
    a = snapshot_event_id(COMMIT, "public", "t", ["a,b", "c"])
    b = snapshot_event_id(COMMIT, "public", "t", ["a", "b,c"])
    assert a != b


def test_topic_is_one_per_aggregate() -> None:
    assert topic_for("order") == "shop.order.events"
    assert topic_for("customer", prefix="it") == "it.customer.events"


def test_table_wide_events_are_recognisable() -> None:
    assert _event(aggregate_id=TABLE_WIDE_ID).table_wide
    assert not _event().table_wide
