"""Postgres text values -> JSON-ready values (the DESIGN.md value encoding).

pgoutput sends column values in their text output form. A converter is chosen
once per Relation column (:func:`converter_for`) and then applied to every
value of that column; converters raise ``ValueError`` (or ``TypeError``,
``KeyError``) on text they cannot read, and :func:`convert` /
``cdc.changes`` turn that into "raw text, reported as unconverted".

Assumptions about the session that produced the text (the replication
connection sets them; the server's defaults are different):

* ``DateStyle = 'ISO'`` - dates ``2026-11-26``, timestamps
  ``2026-11-26 06:39:58.123456``. Other date styles are left unconverted.
* ``TimeZone = 'UTC'`` - timestamptz arrive as ``...+00``; any other offset
  (``+05:30``, ``-08``, historic ``+00:53:28``) is still parsed and converted.
* ``IntervalStyle = 'iso_8601'`` - intervals arrive as ``P1Y2M3DT4H5M6.5S``
  and pass through; the default ``postgres`` style is parsed too.
* ``bytea_output = 'hex'`` (the default); ``escape`` is parsed too.
* ``extra_float_digits`` >= 1 (the default 1, or 3): the shortest text that
  reads back as the same float.
* client encoding UTF-8.

Encodings chosen where Postgres has values JSON cannot hold: numeric keeps its
exact digits as a string (``'NaN'``, ``'Infinity'`` too); float NaN/Infinity
become the strings ``'NaN'``, ``'Infinity'``, ``'-Infinity'``; date/timestamp
infinities stay ``'infinity'``/``'-infinity'``; BC dates use ISO 8601's
astronomical years (1 BC = ``0000``, 44 BC = ``-0043``); timetz is shifted to
UTC and written with ``Z``. Numbers inside json/jsonb are parsed by orjson,
so digits beyond double precision are not kept. Types not listed below
(enums, domains, ranges, inet, money, user types, ...) pass through as text;
arrays of them are lists of text when the Type message names an array type.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final, TypeAlias

import orjson

__all__ = [
    "ARRAY_ELEMENT",
    "Converter",
    "convert",
    "converter_for",
    "parse_array",
    "raw_text",
]

Converter: TypeAlias = Callable[[bytes], Any]
"""Text form (as sent by the server, UTF-8 bytes) -> JSON-ready value; raises if unreadable."""

TextConverter: TypeAlias = Callable[[str], Any]


# ------------------------------------------------------------ scalar, from str

_BOOL: Final = {"t": True, "f": False}
_BOOL_BYTES: Final = {b"t": True, b"f": False}
_FLOAT_SPECIAL: Final = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity"}
_INFINITIES: Final = ("infinity", "-infinity")


def _text(s: str) -> str:
    return s


def _float(s: str | bytes) -> float | str:
    f = float(s)
    if f - f != 0.0:  # NaN or +-Infinity: JSON has no number for them
        return _FLOAT_SPECIAL[s if type(s) is str else s.decode()]  # type: ignore[union-attr]
    return f


def _numeric(s: str) -> str:
    # Exact digits as sent: "12.50", "-0.001", "NaN", "Infinity", "1e-5" never occurs.
    if not s or s[0] not in "-0123456789NI":
        raise ValueError(f"not a numeric: {s!r}")
    return s


def _bc_year(year: str) -> str:
    y = 1 - int(year)  # ISO 8601 astronomical numbering: 1 BC is year 0
    return f"{y:05d}" if y < 0 else f"{y:04d}"


_DATE_RE: Final = re.compile(r"(\d{4,})-(\d\d)-(\d\d)( BC)?")


def _date(s: str) -> str:
    if len(s) == 10 and s[4] == "-" and s[7] == "-":
        return s
    if s in _INFINITIES:
        return s
    m = _DATE_RE.fullmatch(s)
    if m is None:
        raise ValueError(f"not an ISO date: {s!r} (is DateStyle 'ISO'?)")
    if m[4]:
        return f"{_bc_year(m[1])}-{m[2]}-{m[3]}"
    return s


_TIME_RE: Final = re.compile(r"\d\d:\d\d:\d\d(?:\.\d{1,6})?")


def _time(s: str) -> str:
    if _TIME_RE.fullmatch(s) is None:
        raise ValueError(f"not a time: {s!r}")
    return s


_OFFSET_RE: Final = re.compile(r"([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?")


def _offset_seconds(sign: str, h: str, m: str | None, s: str | None) -> int:
    secs = int(h) * 3600 + int(m or 0) * 60 + int(s or 0)
    return -secs if sign == "-" else secs


_TIMETZ_RE: Final = re.compile(r"(\d\d):(\d\d):(\d\d)(\.\d{1,6})?" + _OFFSET_RE.pattern)


def _timetz(s: str) -> str:
    """12:34:56.5+05:30 -> 07:04:56.5Z (time of day in UTC)."""
    m = _TIMETZ_RE.fullmatch(s)
    if m is None:
        raise ValueError(f"not a timetz: {s!r}")
    hh, mm, ss, frac, sign, oh, om, os_ = m.groups()
    day = int(hh) * 3600 + int(mm) * 60 + int(ss) - _offset_seconds(sign, oh, om, os_)
    day %= 86400
    return f"{day // 3600:02d}:{day // 60 % 60:02d}:{day % 60:02d}{frac or ''}Z"


_TIMESTAMP_RE: Final = re.compile(
    r"(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(\.\d{1,6})?(?:" + _OFFSET_RE.pattern + r")?( BC)?"
)


def _timestamp(s: str) -> str:
    """2026-11-26 06:39:58.5 -> 2026-11-26T06:39:58.5 (no zone)."""
    if len(s) >= 19 and s[10] == " " and s[4] == "-" and s[13] == ":" and s[-1] != "C":
        if len(s) > 19 and s[19] != ".":
            raise ValueError(f"not a timestamp: {s!r}")
        return f"{s[:10]}T{s[11:]}"
    if s in _INFINITIES:
        return s
    m = _TIMESTAMP_RE.fullmatch(s)
    if m is None or m[8] is not None:
        raise ValueError(f"not an ISO timestamp: {s!r} (is DateStyle 'ISO'?)")
    year = _bc_year(m[1]) if m[12] else m[1]
    return f"{year}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}{m[7] or ''}"


def _timestamptz(s: str) -> str:
    """2026-11-26 06:39:58.5+00 -> 2026-11-26T06:39:58.5Z; other offsets shifted to UTC."""
    if s.endswith("+00") and len(s) >= 22 and s[10] == " " and s[4] == "-" and s[13] == ":":
        if len(s) > 22 and s[19] != ".":
            raise ValueError(f"not a timestamptz: {s!r}")
        return f"{s[:10]}T{s[11:-3]}Z"
    if s in _INFINITIES:
        return s
    m = _TIMESTAMP_RE.fullmatch(s)
    if m is None or m[8] is None:
        raise ValueError(f"not an ISO timestamptz: {s!r} (is DateStyle 'ISO'?)")
    year_s, mon, day, hh, mi, ss, frac, sign, oh, om, os_, bc = m.groups()
    offset = _offset_seconds(sign, oh, om, os_)
    if bc:
        if offset:
            raise ValueError(f"BC timestamptz with a non-UTC offset is not supported: {s!r}")
        return f"{_bc_year(year_s)}-{mon}-{day}T{hh}:{mi}:{ss}{frac or ''}Z"
    if offset == 0:
        return f"{year_s}-{mon}-{day}T{hh}:{mi}:{ss}{frac or ''}Z"
    # datetime covers years 1..9999, which is where non-UTC offsets can occur.
    dt = datetime(int(year_s), int(mon), int(day), int(hh), int(mi), int(ss)) - timedelta(
        seconds=offset
    )
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
        f"{frac or ''}Z"
    )


_PG_INTERVAL_RE: Final = re.compile(
    r"(?:([+-]?\d+) years? ?)?(?:([+-]?\d+) mons? ?)?(?:([+-]?\d+) days? ?)?"
    r"(?:([+-])?(\d+):(\d\d):(\d\d(?:\.\d{1,6})?))?"
)


def _interval(s: str) -> str:
    """ISO 8601 duration. IntervalStyle iso_8601 is passed through; postgres style parsed."""
    if s[:1] == "P":
        return s
    m = _PG_INTERVAL_RE.fullmatch(s)
    if m is None or not s:
        raise ValueError(f"not an interval in IntervalStyle 'iso_8601' or 'postgres': {s!r}")
    years, mons, days, tsign, hours, mins, secs = m.groups()
    out = ["P"]
    for value, unit in ((years, "Y"), (mons, "M"), (days, "D")):
        if value is not None and int(value) != 0:
            out.append(f"{int(value)}{unit}")
    if hours is not None:
        neg = "-" if tsign == "-" else ""
        time_part = []
        if int(hours):
            time_part.append(f"{neg}{int(hours)}H")
        if int(mins):
            time_part.append(f"{neg}{int(mins)}M")
        if float(secs):
            whole, dot, frac = secs.partition(".")
            time_part.append(f"{neg}{int(whole)}{dot}{frac}S")
        if time_part:
            out.append("T")
            out.extend(time_part)
    return "".join(out) if len(out) > 1 else "PT0S"


def _bytea(s: str) -> str:
    """Hex (\\x0102) or escape output -> base64."""
    raw = bytes.fromhex(s[2:]) if s[:2] == "\\x" else _bytea_escape(s)
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def _bytea_escape(s: str) -> bytes:
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
        elif s[i + 1 : i + 2] == "\\":
            out.append(0x5C)
            i += 2
        else:
            octal = s[i + 1 : i + 4]
            if len(octal) != 3 or not all(ch in "01234567" for ch in octal):
                raise ValueError(f"bad bytea escape at {i}: {s[i : i + 4]!r}")
            out.append(int(octal, 8))
            i += 4
    return bytes(out)


def _json(s: str | bytes) -> Any:
    return orjson.loads(s)


# --------------------------------------------------------------- arrays

# Whitespace as array_in/array_out see it (array_isspace), not Python's wider \s.
_ARRAY_TOKEN: Final = re.compile(
    r'"((?:[^"\\]|\\.)*)"|([^,{}" \t\n\r\v\f]+)|([{}])|(,)|([ \t\n\r\v\f]+)', re.S
)
_UNESCAPE: Final = re.compile(r"\\(.)", re.S)


def parse_array(s: str, element: TextConverter) -> list[Any]:
    """Postgres array literal -> nested lists; unquoted NULL -> None.

    Handles quoting and backslash escapes, nested dimensions and the
    ``[lo:hi]={...}`` prefix of arrays whose lower bound is not 1 (the bounds
    are dropped: JSON lists start at 0).
    """
    pos = 0
    if s[:1] == "[":
        pos = s.find("=") + 1
        if pos == 0:
            raise ValueError(f"array dimensions without '=': {s[:40]!r}")
    if s[pos : pos + 1] != "{":
        raise ValueError(f"not an array literal: {s[:40]!r}")
    stack: list[list[Any]] = []
    current: list[Any] | None = None
    result: list[Any] | None = None
    expect_item = True
    for m in _ARRAY_TOKEN.finditer(s, pos):
        if m.start() != pos:
            raise ValueError(f"unexpected character at {pos} in array literal {s[:40]!r}")
        pos = m.end()
        quoted, bare, brace, comma, _space = m.groups()
        if result is not None:
            if _space is None:
                raise ValueError(
                    f"text after the end of the array literal: {s[m.start() :][:40]!r}"
                )
            continue
        if brace == "{":
            if not expect_item:
                raise ValueError(f"missing ',' before '{{' in array literal {s[:40]!r}")
            new: list[Any] = []
            if current is not None:
                current.append(new)
                stack.append(current)
            current = new
            expect_item = True
        elif brace == "}":
            if current is None or (expect_item and current):
                # unbalanced, or a dangling comma as in {1,}
                raise ValueError(f"unbalanced '}}' or dangling ',' in array literal {s[:40]!r}")
            done = current
            current = stack.pop() if stack else None
            if current is None:
                result = done
            expect_item = False
        elif comma is not None:
            if expect_item or current is None:
                raise ValueError(f"unexpected ',' in array literal {s[:40]!r}")
            expect_item = True
        elif _space is not None:
            continue
        else:
            if current is None or not expect_item:
                raise ValueError(f"misplaced element in array literal {s[:40]!r}")
            if quoted is not None:
                current.append(element(_UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted))
            elif bare.upper() == "NULL":
                current.append(None)
            else:
                current.append(element(_UNESCAPE.sub(r"\1", bare) if "\\" in bare else bare))
            expect_item = False
    if result is None or pos != len(s):
        raise ValueError(f"unterminated array literal {s[:40]!r}")
    return result


# --------------------------------------------------------------- the table

# Element type OID -> text converter. Anything not here is text.
_BY_OID: Final[dict[int, TextConverter]] = {
    16: _BOOL.__getitem__,  # bool
    17: _bytea,  # bytea
    20: int,  # int8
    21: int,  # int2
    23: int,  # int4
    26: int,  # oid
    114: _json,  # json
    3802: _json,  # jsonb
    700: _float,  # float4
    701: _float,  # float8
    1700: _numeric,  # numeric
    1082: _date,  # date
    1083: _time,  # time
    1266: _timetz,  # timetz
    1114: _timestamp,  # timestamp
    1184: _timestamptz,  # timestamptz
    1186: _interval,  # interval
    # text-like: text 25, char 18, name 19, bpchar 1042, varchar 1043, uuid 2950
}

# Array type OID -> element type OID (pg_type.typelem).
ARRAY_ELEMENT: Final[dict[int, int]] = {
    1000: 16,  # bool[]
    1001: 17,  # bytea[]
    1002: 18,  # "char"[]
    1003: 19,  # name[]
    1005: 21,  # int2[]
    1007: 23,  # int4[]
    1016: 20,  # int8[]
    1028: 26,  # oid[]
    1009: 25,  # text[]
    1014: 1042,  # bpchar[]
    1015: 1043,  # varchar[]
    2951: 2950,  # uuid[]
    199: 114,  # json[]
    3807: 3802,  # jsonb[]
    1021: 700,  # float4[]
    1022: 701,  # float8[]
    1231: 1700,  # numeric[]
    1182: 1082,  # date[]
    1183: 1083,  # time[]
    1270: 1266,  # timetz[]
    1115: 1114,  # timestamp[]
    1185: 1184,  # timestamptz[]
    1187: 1186,  # interval[]
    1041: 869,  # inet[]
    651: 650,  # cidr[]
    1040: 829,  # macaddr[]
    143: 142,  # xml[]
    1561: 1560,  # bit[]
    1563: 1562,  # varbit[]
    791: 790,  # money[]
    3221: 3220,  # pg_lsn[]
}


def _timestamptz_bytes(raw: bytes) -> str:
    s = raw.decode()
    # the common case under TimeZone=UTC, inline: 2026-11-26 06:39:58.5+00
    if s[-3:] == "+00" and s[10:11] == " " and s[4:5] == "-" and (len(s) == 22 or s[19:20] == "."):
        return f"{s[:10]}T{s[11:-3]}Z"
    return _timestamptz(s)


def _timestamp_bytes(raw: bytes) -> str:
    return _timestamp(raw.decode())


# Bytes-level fast paths for the common column types (no str detour).
_FAST: Final[dict[int, Converter]] = {
    1700: bytes.decode,  # the server's text is already the exact digits (and NaN, Infinity)
    1184: _timestamptz_bytes,
    1114: _timestamp_bytes,
    16: _BOOL_BYTES.__getitem__,
    20: int,
    21: int,
    23: int,
    26: int,
    114: _json,
    3802: _json,
    700: _float,
    701: _float,
}

_decode: Final = bytes.decode


def _from_text(conv: TextConverter) -> Converter:
    def converter(raw: bytes) -> Any:
        return conv(_decode(raw))

    return converter


def _array_of(element: TextConverter) -> Converter:
    def converter(raw: bytes) -> Any:
        return parse_array(_decode(raw), element)

    return converter


def converter_for(
    type_oid: int, type_modifier: int = -1, type_name: str | None = None
) -> Converter:
    """The converter for one column, chosen once per Relation column.

    ``type_name`` is the name from a pgoutput Type message, which the server
    sends for non-built-in types; a name starting with ``_`` is an array of
    such a type (enum arrays), converted to a list of text. The type modifier
    is accepted for completeness: every supported text form already carries
    what it says (numeric scale, time precision).
    """
    del type_modifier
    fast = _FAST.get(type_oid)
    if fast is not None:
        return fast
    conv = _BY_OID.get(type_oid)
    if conv is not None:
        return _from_text(conv)
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        return _array_of(_BY_OID.get(element, _text))
    if type_name is not None and type_name.startswith("_"):
        return _array_of(_text)
    return _decode


def raw_text(raw: bytes) -> str:
    """What an unconvertible value is kept as."""
    return raw.decode("utf-8", "replace")


def convert(conv: Converter, raw: bytes) -> tuple[Any, bool]:
    """Apply a converter; never raises. Returns (value, converted?) - raw text if not."""
    try:
        return conv(raw), True
    except Exception:  # the contract: an unreadable value is kept as text, never lost
        return raw_text(raw), False
