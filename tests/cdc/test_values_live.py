"""Random rows of random types -> real Postgres -> pgoutput -> RowChange: the values
come back as the DESIGN.md encoding says, and Postgres' own conversions agree."""

from __future__ import annotations

import base64
import datetime as dt
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.changes import RowChange
from cdc.transactions import TransactionAssembler

UTC_SESSION = {"TimeZone": "UTC", "DateStyle": "ISO", "IntervalStyle": "iso_8601"}
LIVE = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _frac(micro: int) -> str:
    return f".{micro:06d}".rstrip("0") if micro else ""


def iso_timestamp(d: dt.datetime) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}{_frac(d.microsecond)}"


def iso_time(t: dt.time) -> str:
    return f"{t.hour:02d}:{t.minute:02d}:{t.second:02d}{_frac(t.microsecond)}"


def iso_duration(td: dt.timedelta) -> str:
    """What IntervalStyle iso_8601 prints for psycopg's timedelta (days + time, no months)."""
    days, micro = td.days, td.seconds * 1_000_000 + td.microseconds
    out = f"{days}D" if days else ""
    h, rest = divmod(micro, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    s, us = divmod(rest, 1_000_000)
    time_part = (
        (f"{h}H" if h else "") + (f"{m}M" if m else "") + (f"{s}{_frac(us)}S" if s or us else "")
    )
    if not out and not time_part:
        return "PT0S"
    return "P" + out + ("T" + time_part if time_part else "")


def float4(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


# column type, SQL cast, strategy, expected JSON-ready value
safe_text = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30
)
aware = st.datetimes(
    min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]),
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | safe_text
    # jsonb keeps numbers as exact decimals of the text sent; below 1e15 Python's repr
    # of a float reads back as the same float, so the comparison is exact
    | st.floats(min_value=-1e15, max_value=1e15, allow_subnormal=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(safe_text, inner, max_size=4),
    max_leaves=10,
)  # fmt: skip

COLUMNS: list[tuple[str, st.SearchStrategy[Any], Callable[[Any], Any]]] = [
    ("bool", st.booleans(), lambda v: v),
    ("int2", st.integers(-(2**15), 2**15 - 1), lambda v: v),
    ("int4", st.integers(-(2**31), 2**31 - 1), lambda v: v),
    ("int8", st.integers(-(2**63), 2**63 - 1), lambda v: v),
    ("numeric", st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-10**20, max_value=10**20), lambda v: Decimal(v)),
    ("float8", st.floats(allow_subnormal=False), lambda v: v if v == v and abs(v) != float("inf") else None),
    ("float4", st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False), float4),
    ("text", safe_text, lambda v: v),
    ("uuid", st.uuids(), str),
    ("date", st.dates(min_value=dt.date(1, 1, 1)), lambda v: v.isoformat()),
    ("time", st.times(), iso_time),
    ("timestamp", st.datetimes(min_value=dt.datetime(1, 1, 1)), iso_timestamp),
    ("timestamptz", aware, lambda v: iso_timestamp(v.astimezone(dt.UTC).replace(tzinfo=None)) + "Z"),
    ("interval", st.timedeltas(min_value=dt.timedelta(days=-10**6), max_value=dt.timedelta(days=10**6)), iso_duration),
    ("jsonb", json_values, lambda v: v),
    ("bytea", st.binary(max_size=40), lambda v: base64.b64encode(v).decode()),
    ("int4[]", st.lists(st.none() | st.integers(-(2**31), 2**31 - 1), max_size=5), lambda v: v),
    ("text[]", st.lists(st.none() | safe_text | st.sampled_from(["NULL", "a,b", '"q"', "{x}", "\\", " s "]), max_size=5), lambda v: v),
    ("numeric[]", st.lists(st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-10**9, max_value=10**9), max_size=4), lambda v: [Decimal(x) for x in v]),
    ("timestamptz[]", st.lists(aware, max_size=3), lambda v: [iso_timestamp(x.astimezone(dt.UTC).replace(tzinfo=None)) + "Z" for x in v]),
    ("bool[]", st.lists(st.none() | st.booleans(), max_size=4), lambda v: v),
]  # fmt: skip
rows = st.lists(
    st.tuples(*(st.none() | strategy for _, strategy, _ in COLUMNS)), min_size=1, max_size=8
)


def _adapt(type_name: str, value: Any) -> Any:
    if value is None:
        return None
    if type_name == "jsonb":
        return Jsonb(value)
    if type_name == "float8" and value != value:
        return float("nan")
    return value


def _decoded(messages: list[tuple[int, bytes]], tmp: Path) -> list[RowChange]:
    asm = TransactionAssembler(tmp)
    out = [i for lsn, m in messages for i in asm.feed(lsn, m) if isinstance(i, RowChange)]
    asm.close()
    return out


def _check(type_name: str, expect: Callable[[Any], Any], sent: Any, got: Any) -> None:
    if sent is None:
        assert got is None
        return
    want = expect(sent)
    if type_name == "float8" and want is None:  # NaN / Infinity travel as strings
        assert got == ("NaN" if sent != sent else "Infinity" if sent > 0 else "-Infinity")
    elif type_name == "numeric":
        assert isinstance(got, str) and Decimal(got) == want
    elif type_name == "numeric[]":
        assert all(isinstance(x, str) for x in got) and [Decimal(x) for x in got] == want
    elif type_name == "float4":
        assert float4(got) == want
    else:
        assert got == want


@pytest.fixture
def values_table(cdc_conn: psycopg.Connection, test_schema: str) -> str:
    cols = ", ".join(f"c{i} {type_name}" for i, (type_name, _, _) in enumerate(COLUMNS))
    cdc_conn.execute(
        sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, " + cols + ")").format(
            sql.Identifier(test_schema, "vals")
        )
    )
    return f"{test_schema}.vals"


@pytest.fixture
def values_slot(values_table: str, logical_slot: Any) -> Any:
    return logical_slot([values_table])


@LIVE
@given(batch=rows)
def test_random_rows_decode_to_the_values_inserted(
    batch: list[tuple[Any, ...]],
    cdc_conn: psycopg.Connection,
    values_table: str,
    values_slot: Any,
    tmp_path: Path,
) -> None:
    slot = values_slot
    schema, table = values_table.split(".")
    names = sql.SQL(", ").join(sql.Identifier(f"c{i}") for i in range(len(COLUMNS)))
    holders = sql.SQL(", ").join(
        sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(type_name))
        for type_name, _, _ in COLUMNS
    )
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(schema, table), names, holders
    )
    with cdc_conn.transaction():
        for row in batch:
            cdc_conn.execute(
                insert, [_adapt(t, v) for (t, _, _), v in zip(COLUMNS, row, strict=True)]
            )
    changes = _decoded(slot.get(**UTC_SESSION), tmp_path / uuid.uuid4().hex)
    assert len(changes) == len(batch)
    for change, row in zip(changes, batch, strict=True):
        assert change.unconverted == () and change.after is not None
        for i, ((type_name, _, expect), sent) in enumerate(zip(COLUMNS, row, strict=True)):
            _check(type_name, expect, sent, change.after[f"c{i}"])


intervals = st.tuples(
    st.integers(-5000, 5000), st.integers(-50000, 50000), st.integers(-(10**13), 10**13)
)
zones = st.sampled_from(
    ["UTC", "Asia/Kathmandu", "America/St_Johns", "Europe/Amsterdam", "Pacific/Chatham"]
)


@pytest.fixture
def styles_slot(cdc_conn: psycopg.Connection, test_schema: str, logical_slot: Any) -> Any:
    cdc_conn.execute(
        sql.SQL("CREATE TABLE {} (id serial PRIMARY KEY, i interval, t timestamptz)").format(
            sql.Identifier(test_schema, "styles")
        )
    )
    return logical_slot([f"{test_schema}.styles"])


@LIVE
@given(values=st.lists(st.tuples(intervals, aware), min_size=1, max_size=10), zone=zones)
def test_server_session_styles_do_not_change_the_decoded_values(
    values: list[tuple[tuple[int, int, int], dt.datetime]],
    zone: str,
    cdc_conn: psycopg.Connection,
    test_schema: str,
    styles_slot: Any,
    tmp_path: Path,
) -> None:
    """Postgres' own ISO 8601 interval output and UTC timestamps are the oracle for
    parsing IntervalStyle 'postgres' and timestamps in any TimeZone."""
    slot = styles_slot
    table = sql.Identifier(test_schema, "styles")
    with cdc_conn.transaction():
        for (months, days, micros), ts in values:
            cdc_conn.execute(
                sql.SQL(
                    "INSERT INTO {} (i, t) VALUES (make_interval(months => %s, days => %s) + %s * interval '1 microsecond', %s)"
                ).format(table),
                (months, days, micros, ts),
            )
    other = _decoded(
        slot.peek(TimeZone=zone, DateStyle="ISO", IntervalStyle="postgres"), tmp_path / "postgres"
    )
    iso = _decoded(slot.get(**UTC_SESSION), tmp_path / "iso")
    assert [c.after for c in other] == [c.after for c in iso]
    assert all(c.unconverted == () for c in iso + other)
    for change, (_, ts) in zip(iso, values, strict=True):
        assert change.after is not None
        assert change.after["t"] == iso_timestamp(ts.astimezone(dt.UTC).replace(tzinfo=None)) + "Z"
