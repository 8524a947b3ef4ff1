"""pgoutput decoder and replication framing: layout, round trips, and malformed input.

Bytes recorded from the real server are exercised in test_pgoutput_recorded.py;
here they seed the fuzzer.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdc.pgoutput import (
    PG_EPOCH_UNIX_US,
    UNCHANGED_TOAST,
    Begin,
    Binary,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputDecoder,
    PgOutputError,
    PrimaryKeepalive,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    XLogData,
    decode_message,
    decode_row_change,
    encode_message,
    parse_copy_data,
    pg_now_us,
    pg_us_to_unix_ms,
    standby_status_update,
)

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = [
    base64.b64decode(b64)
    for name in ("pgoutput_dml.json", "pgoutput_types.json")
    for _, b64 in json.loads((FIXTURES / name).read_text())["messages"]
]


# ------------------------------------------------------------------ layout


def test_begin_layout() -> None:
    raw = b"B" + struct.pack(">QqI", 0x1_0000_0010, 123_456, 789)
    assert decode_message(raw) == Begin(final_lsn=0x1_0000_0010, commit_ts=123_456, xid=789)


def test_insert_with_every_column_kind() -> None:
    raw = (
        b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">H", 4)
        + b"n" + b"u" + b"t" + struct.pack(">I", 3) + b"abc" + b"b" + struct.pack(">I", 2) + b"\x00\x01"
    )  # fmt: skip
    msg = decode_message(raw)
    assert isinstance(msg, Insert)
    assert msg.relation_id == 16384 and msg.xid is None
    assert msg.new[0] is None and msg.new[1] is UNCHANGED_TOAST and msg.new[2] == b"abc"
    assert isinstance(msg.new[3], Binary) and msg.new[3] == b"\x00\x01"
    assert UNCHANGED_TOAST is not None and repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"


def test_streamed_messages_carry_an_xid_only_inside_a_stream_block() -> None:
    body = struct.pack(">I", 7) + struct.pack(">I", 16384) + b"N" + struct.pack(">H", 0)
    assert decode_message(b"I" + body, in_stream=True) == Insert(7, 16384, ())
    with pytest.raises(PgOutputError):  # read as v1 the xid is taken for the relation id
        decode_message(b"I" + body)
    decoder = PgOutputDecoder()
    decoder.decode(encode_message(StreamStart(7, True)))
    assert decoder.decode(b"I" + body) == Insert(7, 16384, ())
    decoder.decode(b"E")
    assert not decoder.in_stream


def test_truncate_options() -> None:
    msg = decode_message(b"T" + struct.pack(">IBII", 2, 3, 10, 11))
    assert msg == Truncate(None, 3, (10, 11))
    assert isinstance(msg, Truncate) and msg.cascade and msg.restart_identity


ALL_MESSAGES: list[tuple[Any, bool]] = [
    (Begin(1, 2, 3), False),
    (Commit(0, 10, 20, 30), False),
    (Origin(5, "upstream"), False),
    (
        Relation(
            None, 1, "public", "t", "f", (Column(1, "id", 23, -1), Column(0, "n", 1700, 786438))
        ),
        False,
    ),
    (Relation(9, 1, "", "t", "d", ()), True),
    (Type(None, 50000, "public", "mood"), False),
    (Type(9, 50001, "public", "_mood"), True),
    (Insert(None, 1, (b"1", None, UNCHANGED_TOAST, Binary(b"\x00"))), False),
    (Update(None, 1, None, None, (b"2",)), False),
    (Update(9, 1, "K", (b"1", None), (b"2", b"x")), True),
    (Update(None, 1, "O", (b"1", b"a"), (b"1", b"b")), False),
    (Delete(None, 1, "K", (b"1",)), False),
    (Delete(9, 1, "O", (b"1", b"a")), True),
    (Truncate(None, 0, (1, 2, 3)), False),
    (Truncate(9, 1, ()), True),
    (Message(None, False, 100, "prefix", b"\x00content"), False),
    (Message(9, True, 100, "", b""), True),
    (StreamStart(9, True), False),
    (StreamStop(), False),
    (StreamCommit(9, 0, 100, 200, 300), False),
    (StreamAbort(9, 10), False),
    (StreamAbort(9, 10, 0x500, 77), False),  # protocol v4 (PostgreSQL 16, streaming=parallel)
]


@pytest.mark.parametrize(("msg", "in_stream"), ALL_MESSAGES, ids=lambda v: type(v).__name__)
def test_every_message_round_trips(msg: Any, in_stream: bool) -> None:
    assert decode_message(encode_message(msg), in_stream=in_stream) == msg


def test_two_phase_messages_are_named_in_the_error() -> None:
    with pytest.raises(PgOutputError, match="two_phase"):
        decode_message(b"P" + bytes(40))


def test_unknown_message_type_is_named() -> None:
    with pytest.raises(
        PgOutputError, match=r"unknown pgoutput message type 0x5a \('Z'\) at offset 0"
    ):
        decode_message(b"Z")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty pgoutput message"),
        (b"B" + bytes(19), "Begin message: expected Int64 final LSN"),
        (
            b"I" + struct.pack(">I", 1) + b"X",
            "Insert message: expected 'N' \\(new tuple\\) at offset 5",
        ),
        (
            b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 2) + b"n",
            "column 1 of 2 in TupleData",
        ),
        (
            b"I"
            + struct.pack(">I", 1)
            + b"N"
            + struct.pack(">H", 1)
            + b"t"
            + struct.pack(">I", 9)
            + b"ab",
            "column 0 of 1",
        ),
        (
            b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 1) + b"x",
            "column kind .* got 0x78",
        ),
        (
            b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">H", 0) + b"junk",
            "end of the message \\(4 bytes left over\\)",
        ),
        (b"R" + struct.pack(">I", 1) + b"public", "NUL-terminated namespace"),
        (b"D" + struct.pack(">I", 1) + b"N", "'K' \\(old key\\) or 'O' \\(old tuple\\)"),
        (b"T" + struct.pack(">IB", 100, 0), "100 Int32 relation ids"),
        (
            b"M" + struct.pack(">BQ", 1, 5) + b"p\x00" + struct.pack(">I", 10) + b"short",
            "10 bytes of content",
        ),
    ],
)
def test_malformed_messages_say_what_was_expected_where(raw: bytes, expected: str) -> None:
    with pytest.raises(PgOutputError, match=expected):
        decode_message(raw)


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=200), st.booleans())
@example(b"I\x00\x00\x00\x01N\xff\xff", False)
@example(b"T\xff\xff\xff\xff\x00", False)
@example(b"R\x00\x00\x00\x01\x00\x00d\xff\xff", False)
def test_random_bytes_raise_only_pgoutput_error(data: bytes, in_stream: bool) -> None:
    try:
        decode_message(data, in_stream=in_stream)
    except PgOutputError:
        pass


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(RECORDED)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif raw:
            del raw[pos]
    return bytes(raw)


def _spec(_rel: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    raise PgOutputError("unknown relation")


@settings(max_examples=3000, deadline=None)
@given(mutated(), st.booleans())
def test_mutated_server_messages_raise_only_pgoutput_error(data: bytes, in_stream: bool) -> None:
    try:
        decode_message(data, in_stream=in_stream)
    except PgOutputError:
        pass
    if data[:1] in (b"I", b"U", b"D"):
        names = tuple(f"c{i}" for i in range(200))

        def spec(_rel: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
            n = (data[10] << 8 | data[11]) if len(data) > 11 else 0
            return names[:n], (bytes.decode,) * n

        try:
            decode_row_change(data, spec, in_stream=in_stream)
        except PgOutputError:
            pass


# ------------------------------------------------------------------ replication framing


def test_xlogdata_layout() -> None:
    raw = b"w" + struct.pack(">QQq", 0x16_B374D848, 0x16_B374D900, 5) + b"B..."
    assert parse_copy_data(raw) == XLogData(0x16_B374D848, 0x16_B374D900, 5, b"B...")
    assert parse_copy_data(memoryview(raw)) == parse_copy_data(raw)


def test_primary_keepalive_layout() -> None:
    raw = b"k" + struct.pack(">QqB", 0x10, 99, 1)
    assert parse_copy_data(raw) == PrimaryKeepalive(0x10, 99, True)
    assert parse_copy_data(raw[:-1] + b"\x00") == PrimaryKeepalive(0x10, 99, False)


@pytest.mark.parametrize("raw", [b"", b"w" + bytes(23), b"k" + bytes(16), b"k" + bytes(18), b"x"])
def test_malformed_copy_data_is_named(raw: bytes) -> None:
    with pytest.raises(PgOutputError):
        parse_copy_data(raw)


def test_standby_status_update_layout() -> None:
    raw = standby_status_update(30, 20, 10, client_time_us=7, reply_requested=True)
    assert raw == b"r" + struct.pack(">QQQqB", 30, 20, 10, 7, 1)
    assert len(raw) == 34
    # flush and apply default to the write position; the clock to now
    kind, write, flush, apply, now, reply = struct.unpack(">cQQQqB", standby_status_update(5))
    assert (kind, write, flush, apply, reply) == (b"r", 5, 5, 5, 0)
    assert abs(now - pg_now_us()) < 5_000_000


def test_postgres_epoch_conversion() -> None:
    assert PG_EPOCH_UNIX_US == 946_684_800_000_000
    assert pg_us_to_unix_ms(0) == 946_684_800_000
    assert pg_us_to_unix_ms(1_500) == 946_684_800_001
