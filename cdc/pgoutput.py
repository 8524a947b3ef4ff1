"""pgoutput, sans-I/O: bytes in, typed messages out.

Two layers, both pure functions of bytes:

* the streaming-replication framing (CopyData payloads ``w`` XLogData, ``k``
  primary keepalive, and the ``r`` standby status update we send back), from
  the Postgres docs "Streaming Replication Protocol";
* the logical replication messages inside XLogData (protocol versions 1 and 2),
  from "Logical Replication Message Formats" (PostgreSQL 15 layout).

Nothing here knows about sockets, asyncio or Kafka. Malformed input raises
:class:`PgOutputError` naming what was expected at which offset.
"""

from __future__ import annotations

import binascii
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

__all__ = [
    "PG_EPOCH_UNIX_US",
    "UNCHANGED_TOAST",
    "Begin",
    "Binary",
    "Column",
    "ColumnValue",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputDecoder",
    "PgOutputError",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "Relation",
    "Row",
    "RowSpec",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "Type",
    "Update",
    "XLogData",
    "decode_message",
    "decode_row_change",
    "encode_message",
    "message_type",
    "parse_copy_data",
    "pg_now_us",
    "pg_us_to_unix_ms",
    "standby_status_update",
    "unpack_begin",
    "unpack_commit",
]

# 2000-01-01T00:00:00Z in microseconds since the Unix epoch: every Postgres
# TimestampTz on the wire counts from there.
PG_EPOCH_UNIX_US: Final = 946_684_800_000_000


class PgOutputError(ValueError):
    """Bytes that are not a well-formed pgoutput / replication-protocol message."""


class _UnchangedToast:
    """Marker for a column whose unchanged TOAST value the server did not send ('u')."""

    __slots__ = ()
    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = _UnchangedToast()


class Binary(bytes):
    """A column value sent in binary format ('b'); plain ``bytes`` means text format ('t')."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Binary({bytes(self)!r})"


# One column of a TupleData: None ('n'), UNCHANGED_TOAST ('u'), bytes ('t', the
# text form, not yet decoded) or Binary ('b').
ColumnValue: TypeAlias = "bytes | _UnchangedToast | None"


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # LSN of the commit record: the transaction's commit LSN
    commit_ts: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # end of the commit record: what to confirm once published
    commit_ts: int


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int  # bit 1: part of the replica identity key
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    xid: int | None  # only inside a streamed transaction (v2)
    relation_id: int
    namespace: str  # "" stands for pg_catalog on the wire; we keep what was sent
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    xid: int | None
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    xid: int | None
    relation_id: int
    new: tuple[ColumnValue, ...]


@dataclass(frozen=True, slots=True)
class Update:
    xid: int | None
    relation_id: int
    old_kind: str | None  # 'K' old key, 'O' old tuple (REPLICA IDENTITY FULL), None
    old: tuple[ColumnValue, ...] | None
    new: tuple[ColumnValue, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    xid: int | None
    relation_id: int
    old_kind: str  # 'K' or 'O'
    old: tuple[ColumnValue, ...]


@dataclass(frozen=True, slots=True)
class Truncate:
    xid: int | None
    options: int  # bit 1 CASCADE, bit 2 RESTART IDENTITY
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class Message:
    """pg_logical_emit_message() output (needs the ``messages`` option)."""

    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    xid: int
    subxid: int  # == xid when the whole transaction aborted
    # Protocol v4 with streaming=parallel (PostgreSQL 16+) adds these two.
    abort_lsn: int | None = None
    abort_ts: int | None = None


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)


# ---------------------------------------------------------------- decoding

_U8 = struct.Struct(">B").unpack_from
_U16 = struct.Struct(">H").unpack_from
_I32 = struct.Struct(">i").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_I64 = struct.Struct(">q").unpack_from
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_STREAM_COMMIT = struct.Struct(">IBQQq")
_STREAM_ABORT = struct.Struct(">II")
_STREAM_ABORT_V4 = struct.Struct(">IIQq")
_STREAM_START = struct.Struct(">IB")
_REL_ID = struct.Struct(">I")
_XID_REL_ID = struct.Struct(">II")

_NAMES: Final = {
    0x42: "Begin",
    0x43: "Commit",
    0x4F: "Origin",
    0x52: "Relation",
    0x59: "Type",
    0x49: "Insert",
    0x55: "Update",
    0x44: "Delete",
    0x54: "Truncate",
    0x4D: "Message",
    0x53: "Stream Start",
    0x45: "Stream Stop",
    0x63: "Stream Commit",
    0x41: "Stream Abort",
}
# Protocol v3 (two_phase) messages: named so the error can say what to change.
_TWO_PHASE: Final = {
    0x62: "Begin Prepare",
    0x50: "Prepare",
    0x4B: "Commit Prepared",
    0x72: "Rollback Prepared",
    0x70: "Stream Prepare",
}


def _fail(buf: bytes, kind: str, pos: int, expected: str) -> PgOutputError:
    return PgOutputError(
        f"malformed pgoutput {kind} message: expected {expected} at offset {pos}, "
        f"message is {len(buf)} bytes (starts {buf[:16].hex()}); "
        "is the slot using plugin pgoutput with proto_version 1 or 2?"
    )


def _need(buf: bytes, pos: int, n: int, kind: str, what: str) -> None:
    if pos + n > len(buf):
        raise _fail(buf, kind, pos, what)


def _string(buf: bytes, pos: int, kind: str, what: str) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise _fail(buf, kind, pos, f"a NUL-terminated {what}")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise _fail(buf, kind, pos, f"a UTF-8 {what}") from None


def _end(buf: bytes, pos: int, kind: str) -> None:
    if pos != len(buf):
        raise _fail(buf, kind, pos, f"the end of the message ({len(buf) - pos} bytes left over)")


def _tuple(buf: bytes, pos: int, kind: str) -> tuple[tuple[ColumnValue, ...], int]:
    """TupleData: Int16 count, then per column a kind byte 'n' | 'u' | 't' | 'b'."""
    if pos + 2 > len(buf):
        raise _fail(buf, kind, pos, "Int16 column count of TupleData")
    (n,) = _U16(buf, pos)
    pos += 2
    out: list[ColumnValue] = []
    append = out.append
    size = len(buf)
    try:
        for _ in range(n):
            k = buf[pos]
            if k == 0x74:  # 't'
                (ln,) = _I32(buf, pos + 1)
                pos += 5
                end = pos + ln
                if ln < 0 or end > size:
                    break
                append(buf[pos:end])
                pos = end
            elif k == 0x6E:  # 'n'
                append(None)
                pos += 1
            elif k == 0x75:  # 'u'
                append(UNCHANGED_TOAST)
                pos += 1
            elif k == 0x62:  # 'b'
                (ln,) = _I32(buf, pos + 1)
                pos += 5
                end = pos + ln
                if ln < 0 or end > size:
                    break
                append(Binary(buf[pos:end]))
                pos = end
            else:
                raise _fail(
                    buf,
                    kind,
                    pos,
                    f"column kind 'n', 'u', 't' or 'b' for column {len(out)}, got {k:#04x}",
                )
    except (IndexError, struct.error):
        pass
    if len(out) != n:
        raise _fail(buf, kind, pos, f"column {len(out)} of {n} in TupleData (truncated)")
    return tuple(out), pos


def _xid_rel(buf: bytes, streamed: bool, kind: str) -> tuple[int | None, int, int]:
    if streamed:
        _need(buf, 1, 8, kind, "Int32 xid and Int32 relation id")
        xid, rel = _XID_REL_ID.unpack_from(buf, 1)
        return xid, rel, 9
    _need(buf, 1, 4, kind, "Int32 relation id")
    return None, _REL_ID.unpack_from(buf, 1)[0], 5


def _insert(buf: bytes, streamed: bool) -> Insert:
    xid, rel, pos = _xid_rel(buf, streamed, "Insert")
    if pos >= len(buf) or buf[pos] != 0x4E:
        raise _fail(buf, "Insert", pos, "'N' (new tuple)")
    new, pos = _tuple(buf, pos + 1, "Insert")
    _end(buf, pos, "Insert")
    return Insert(xid, rel, new)


def _update(buf: bytes, streamed: bool) -> Update:
    xid, rel, pos = _xid_rel(buf, streamed, "Update")
    if pos >= len(buf):
        raise _fail(buf, "Update", pos, "'K', 'O' or 'N'")
    k = buf[pos]
    old_kind: str | None = None
    old = None
    if k == 0x4B or k == 0x4F:  # 'K' / 'O'
        old_kind = "K" if k == 0x4B else "O"
        old, pos = _tuple(buf, pos + 1, "Update")
        if pos >= len(buf):
            raise _fail(buf, "Update", pos, "'N' (new tuple)")
        k = buf[pos]
    if k != 0x4E:
        raise _fail(buf, "Update", pos, "'N' (new tuple)" if old_kind else "'K', 'O' or 'N'")
    new, pos = _tuple(buf, pos + 1, "Update")
    _end(buf, pos, "Update")
    return Update(xid, rel, old_kind, old, new)


def _delete(buf: bytes, streamed: bool) -> Delete:
    xid, rel, pos = _xid_rel(buf, streamed, "Delete")
    if pos >= len(buf) or buf[pos] not in (0x4B, 0x4F):
        raise _fail(buf, "Delete", pos, "'K' (old key) or 'O' (old tuple)")
    old_kind = "K" if buf[pos] == 0x4B else "O"
    old, pos = _tuple(buf, pos + 1, "Delete")
    _end(buf, pos, "Delete")
    return Delete(xid, rel, old_kind, old)


def _fixed(buf: bytes, s: struct.Struct, kind: str, what: str) -> tuple[int, ...]:
    if len(buf) != 1 + s.size:
        raise _fail(buf, kind, 1, f"{what} ({s.size} bytes, message must be {1 + s.size} bytes)")
    return s.unpack_from(buf, 1)


def unpack_begin(buf: bytes) -> tuple[int, int, int]:
    """Begin bytes -> (final_lsn, commit_ts, xid) without building a message (hot path)."""
    if len(buf) != 21 or buf[0] != 0x42:
        raise _fail(
            buf, "Begin", 0, "'B', Int64 final LSN, Int64 commit time, Int32 xid (21 bytes)"
        )
    return _BEGIN.unpack_from(buf, 1)


def unpack_commit(buf: bytes) -> tuple[int, int, int, int]:
    """Commit bytes -> (flags, commit_lsn, end_lsn, commit_ts) without building a message."""
    if len(buf) != 26 or buf[0] != 0x43:
        raise _fail(
            buf,
            "Commit",
            0,
            "'C', Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time (26 bytes)",
        )
    return _COMMIT.unpack_from(buf, 1)


def _begin(buf: bytes) -> Begin:
    final_lsn, ts, xid = _fixed(
        buf, _BEGIN, "Begin", "Int64 final LSN, Int64 commit time, Int32 xid"
    )
    return Begin(final_lsn, ts, xid)


def _commit(buf: bytes) -> Commit:
    flags, lsn, end, ts = _fixed(
        buf, _COMMIT, "Commit", "Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time"
    )
    return Commit(flags, lsn, end, ts)


def _origin(buf: bytes) -> Origin:
    _need(buf, 1, 8, "Origin", "Int64 commit LSN")
    (lsn,) = _U64(buf, 1)
    name, pos = _string(buf, 9, "Origin", "origin name")
    _end(buf, pos, "Origin")
    return Origin(lsn, name)


def _relation(buf: bytes, streamed: bool) -> Relation:
    kind = "Relation"
    xid, rel, pos = _xid_rel(buf, streamed, kind)
    namespace, pos = _string(buf, pos, kind, "namespace")
    name, pos = _string(buf, pos, kind, "relation name")
    _need(buf, pos, 3, kind, "Int8 replica identity and Int16 column count")
    ident = chr(buf[pos])
    (n,) = _U16(buf, pos + 1)
    pos += 3
    cols = []
    for i in range(n):
        _need(buf, pos, 1, kind, f"Int8 flags of column {i}")
        flags = buf[pos]
        cname, pos = _string(buf, pos + 1, kind, f"name of column {i}")
        _need(buf, pos, 8, kind, f"Int32 type OID and Int32 type modifier of column {i}")
        (oid,) = _U32(buf, pos)
        (typmod,) = _I32(buf, pos + 4)
        pos += 8
        cols.append(Column(flags, cname, oid, typmod))
    _end(buf, pos, kind)
    return Relation(xid, rel, namespace, name, ident, tuple(cols))


def _type(buf: bytes, streamed: bool) -> Type:
    xid, oid, pos = _xid_rel(buf, streamed, "Type")
    namespace, pos = _string(buf, pos, "Type", "namespace")
    name, pos = _string(buf, pos, "Type", "type name")
    _end(buf, pos, "Type")
    return Type(xid, oid, namespace, name)


def _truncate(buf: bytes, streamed: bool) -> Truncate:
    kind = "Truncate"
    pos = 1
    xid = None
    if streamed:
        _need(buf, pos, 4, kind, "Int32 xid")
        (xid,) = _U32(buf, pos)
        pos += 4
    _need(buf, pos, 5, kind, "Int32 relation count and Int8 options")
    (n,) = _U32(buf, pos)
    options = buf[pos + 4]
    pos += 5
    _need(buf, pos, 4 * n, kind, f"{n} Int32 relation ids")
    rels = struct.unpack_from(f">{n}I", buf, pos)
    _end(buf, pos + 4 * n, kind)
    return Truncate(xid, options, rels)


def _message(buf: bytes, streamed: bool) -> Message:
    kind = "Message"
    pos = 1
    xid = None
    if streamed:
        _need(buf, pos, 4, kind, "Int32 xid")
        (xid,) = _U32(buf, pos)
        pos += 4
    _need(buf, pos, 9, kind, "Int8 flags and Int64 LSN")
    flags = buf[pos]
    (lsn,) = _U64(buf, pos + 1)
    prefix, pos = _string(buf, pos + 9, kind, "prefix")
    _need(buf, pos, 4, kind, "Int32 content length")
    (ln,) = _U32(buf, pos)
    pos += 4
    _need(buf, pos, ln, kind, f"{ln} bytes of content")
    _end(buf, pos + ln, kind)
    return Message(xid, bool(flags & 1), lsn, prefix, bytes(buf[pos : pos + ln]))


def _stream_start(buf: bytes) -> StreamStart:
    xid, first = _fixed(buf, _STREAM_START, "Stream Start", "Int32 xid and Int8 first-segment flag")
    return StreamStart(xid, first == 1)


def _stream_commit(buf: bytes) -> StreamCommit:
    xid, flags, lsn, end, ts = _fixed(
        buf,
        _STREAM_COMMIT,
        "Stream Commit",
        "Int32 xid, Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit time",
    )
    return StreamCommit(xid, flags, lsn, end, ts)


def _stream_abort(buf: bytes) -> StreamAbort:
    if len(buf) == 1 + _STREAM_ABORT_V4.size:
        return StreamAbort(*_STREAM_ABORT_V4.unpack_from(buf, 1))
    xid, subxid = _fixed(
        buf, _STREAM_ABORT, "Stream Abort", "Int32 xid and Int32 subtransaction xid"
    )
    return StreamAbort(xid, subxid)


def decode_message(
    data: bytes | bytearray | memoryview, *, in_stream: bool = False
) -> PgOutputMessage:
    """Decode one pgoutput message (the payload of one XLogData).

    ``in_stream`` says whether we are between Stream Start and Stream Stop: only
    there do protocol-v2 messages carry the xid field. :class:`PgOutputDecoder`
    tracks that for you.
    """
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise PgOutputError("empty pgoutput message: expected a message type byte at offset 0")
    t = buf[0]
    # Hot path first: row changes.
    if t == 0x49:
        return _insert(buf, in_stream)
    if t == 0x55:
        return _update(buf, in_stream)
    if t == 0x44:
        return _delete(buf, in_stream)
    if t == 0x42:
        return _begin(buf)
    if t == 0x43:
        return _commit(buf)
    if t == 0x52:
        return _relation(buf, in_stream)
    if t == 0x59:
        return _type(buf, in_stream)
    if t == 0x54:
        return _truncate(buf, in_stream)
    if t == 0x4D:
        return _message(buf, in_stream)
    if t == 0x4F:
        return _origin(buf)
    if t == 0x53:
        return _stream_start(buf)
    if t == 0x45:
        if len(buf) != 1:
            raise _fail(buf, "Stream Stop", 1, "the end of the message")
        return StreamStop()
    if t == 0x63:
        return _stream_commit(buf)
    if t == 0x41:
        return _stream_abort(buf)
    if t in _TWO_PHASE:
        raise PgOutputError(
            f"pgoutput {_TWO_PHASE[t]} message (protocol v3, two-phase commit) is not supported: "
            "start replication without the two_phase option"
        )
    raise PgOutputError(
        f"unknown pgoutput message type {t:#04x} ({chr(t)!r}) at offset 0: expected one of "
        + ", ".join(f"{chr(k)!r} {v}" for k, v in _NAMES.items())
    )


def message_type(data: bytes | bytearray | memoryview) -> str:
    """Human name of a raw message's type byte (for logs and errors)."""
    if not data:
        return "empty"
    return _NAMES.get(data[0], f"unknown {data[0]:#04x}")


class PgOutputDecoder:
    """Decodes a stream of pgoutput messages, tracking Stream Start/Stop.

    The only state the wire format needs: whether we are inside a streamed
    block, where protocol-v2 row messages carry an extra xid.
    """

    __slots__ = ("in_stream",)

    def __init__(self) -> None:
        self.in_stream = False

    def decode(self, data: bytes | bytearray | memoryview) -> PgOutputMessage:
        msg = decode_message(data, in_stream=self.in_stream)
        if type(msg) is StreamStart:
            self.in_stream = True
        elif type(msg) is StreamStop:
            self.in_stream = False
        return msg


# ------------------------------------------- hot path: row changes straight to dicts
# Decoding Insert/Update/Delete into message objects and then converting their
# tuples walks every column twice; the capture loop uses this single pass
# instead. The caller supplies, per relation id, the column names and one
# converter per column; pgoutput still knows nothing of value types.

RowSpec: TypeAlias = "tuple[tuple[str, ...], tuple[Callable[[bytes], Any], ...]]"
Row: TypeAlias = "tuple[dict[str, Any], list[str] | None, list[str] | None, int]"


def _b64(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


def _row(buf: bytes, pos: int, kind: str, spec: RowSpec) -> Row:
    """TupleData -> ({name: converted value}, unchanged-TOAST names, unconverted names, end).

    A converter that raises leaves the raw text in the row and the column in
    the unconverted list; a binary ('b') value is kept as base64, also listed.
    """
    names, converters = spec
    size = len(buf)
    if pos + 2 > size:
        raise _fail(buf, kind, pos, "Int16 column count of TupleData")
    n = (buf[pos] << 8) | buf[pos + 1]
    if n != len(names):
        raise PgOutputError(
            f"pgoutput {kind} tuple has {n} columns but the Relation message for it lists "
            f"{len(names)} ({', '.join(names)[:200]}); the relation cache is out of step with the "
            "stream (was a Relation message skipped?)"
        )
    pos += 2
    row: dict[str, Any] = {}
    unavailable: list[str] | None = None
    unconverted: list[str] | None = None
    done = 0
    try:
        for name, conv in zip(names, converters, strict=False):
            k = buf[pos]
            if k == 0x74:  # 't'
                # a length running past the end is caught after the loop (pos > size)
                end = pos + 5 + _U32(buf, pos + 1)[0]
                raw = buf[pos + 5 : end]
                pos = end
                try:
                    row[name] = conv(raw)
                except Exception:  # unreadable: keep the text, never lose the value
                    row[name] = raw.decode("utf-8", "replace")
                    if unconverted is None:
                        unconverted = []
                    unconverted.append(name)
            elif k == 0x6E:  # 'n'
                row[name] = None
                pos += 1
            elif k == 0x75:  # 'u'
                if unavailable is None:
                    unavailable = []
                unavailable.append(name)
                pos += 1
            elif k == 0x62:  # 'b'
                end = pos + 5 + _U32(buf, pos + 1)[0]
                if end > size:
                    break
                row[name] = _b64(buf[pos + 5 : end])
                pos = end
                if unconverted is None:
                    unconverted = []
                unconverted.append(name)
            else:
                raise _fail(
                    buf,
                    kind,
                    pos,
                    f"column kind 'n', 'u', 't' or 'b' for column {done}, got {k:#04x}",
                )
            done += 1
    except (IndexError, struct.error):
        pass
    if done != n or pos > size:
        raise _fail(buf, kind, min(pos, size), f"column {done} of {n} in TupleData (truncated)")
    return row, unavailable, unconverted, pos


def decode_row_change(
    data: bytes, spec_for: Callable[[int], RowSpec], *, in_stream: bool = False
) -> tuple[str, int, str | None, Row | None, Row | None]:
    """Insert/Update/Delete bytes -> (type 'I'|'U'|'D', relation id, old kind, old row, new row).

    ``spec_for(relation_id)`` gives the column names and converters (it may
    raise for an unknown relation). Old kind is 'K', 'O' or None; rows are
    ``(values, unavailable, unconverted, end offset)``.
    """
    t = data[0] if data else 0
    kind = "Insert" if t == 0x49 else "Update" if t == 0x55 else "Delete" if t == 0x44 else ""
    if not kind:
        raise _fail(data, "row change", 0, "'I', 'U' or 'D'")
    pos = 9 if in_stream else 5
    if len(data) <= pos:
        raise _fail(
            data, kind, 1, "Int32 xid and Int32 relation id" if in_stream else "Int32 relation id"
        )
    rel = _U32(data, pos - 4)[0]
    spec = spec_for(rel)
    k = data[pos]
    if t == 0x49:
        if k != 0x4E:
            raise _fail(data, kind, pos, "'N' (new tuple)")
        new = _row(data, pos + 1, kind, spec)
        if new[3] != len(data):
            _end(data, new[3], kind)
        return "I", rel, None, None, new
    old_kind: str | None = None
    old: Row | None = None
    if k == 0x4B or k == 0x4F:  # 'K' / 'O'
        old_kind = "K" if k == 0x4B else "O"
        old = _row(data, pos + 1, kind, spec)
        pos = old[3]
        if t == 0x44:
            _end(data, pos, kind)
            return "D", rel, old_kind, old, None
        if pos >= len(data):
            raise _fail(data, kind, pos, "'N' (new tuple)")
        k = data[pos]
    if t == 0x44:
        raise _fail(data, kind, pos, "'K' (old key) or 'O' (old tuple)")
    if k != 0x4E:
        raise _fail(data, kind, pos, "'N' (new tuple)")
    new = _row(data, pos + 1, kind, spec)
    _end(data, new[3], kind)
    return "U", rel, old_kind, old, new


# ---------------------------------------------------------------- encoding
# The server is the only real producer of these bytes; the encoder exists so
# tests, fuzzing and the benchmark can build messages the decoder must accept.


def _enc_tuple(values: tuple[ColumnValue, ...]) -> bytes:
    parts = [struct.pack(">H", len(values))]
    for v in values:
        if v is None:
            parts.append(b"n")
        elif v is UNCHANGED_TOAST:
            parts.append(b"u")
        else:
            assert isinstance(v, bytes)
            parts.append(b"b" if isinstance(v, Binary) else b"t")
            parts.append(struct.pack(">i", len(v)))
            parts.append(v)
    return b"".join(parts)


def _enc_xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack(">I", xid)


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def encode_message(msg: PgOutputMessage) -> bytes:
    """Message -> the bytes pgoutput would send (xid fields only when set)."""
    if isinstance(msg, Insert):
        return (
            b"I"
            + _enc_xid(msg.xid)
            + struct.pack(">I", msg.relation_id)
            + b"N"
            + _enc_tuple(msg.new)
        )
    if isinstance(msg, Update):
        old = b"" if msg.old is None else (msg.old_kind or "O").encode() + _enc_tuple(msg.old)
        return (
            b"U"
            + _enc_xid(msg.xid)
            + struct.pack(">I", msg.relation_id)
            + old
            + b"N"
            + _enc_tuple(msg.new)
        )
    if isinstance(msg, Delete):
        return (
            b"D"
            + _enc_xid(msg.xid)
            + struct.pack(">I", msg.relation_id)
            + msg.old_kind.encode()
            + _enc_tuple(msg.old)
        )
    if isinstance(msg, Begin):
        return b"B" + _BEGIN.pack(msg.final_lsn, msg.commit_ts, msg.xid)
    if isinstance(msg, Commit):
        return b"C" + _COMMIT.pack(msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_ts)
    if isinstance(msg, Origin):
        return b"O" + struct.pack(">Q", msg.commit_lsn) + _cstr(msg.name)
    if isinstance(msg, Relation):
        cols = b"".join(
            bytes([c.flags]) + _cstr(c.name) + struct.pack(">Ii", c.type_oid, c.type_modifier)
            for c in msg.columns
        )
        return (
            b"R" + _enc_xid(msg.xid) + struct.pack(">I", msg.relation_id) + _cstr(msg.namespace)
            + _cstr(msg.name) + msg.replica_identity.encode() + struct.pack(">H", len(msg.columns)) + cols
        )  # fmt: skip
    if isinstance(msg, Type):
        return (
            b"Y"
            + _enc_xid(msg.xid)
            + struct.pack(">I", msg.type_oid)
            + _cstr(msg.namespace)
            + _cstr(msg.name)
        )
    if isinstance(msg, Truncate):
        n = len(msg.relation_ids)
        return b"T" + _enc_xid(msg.xid) + struct.pack(f">IB{n}I", n, msg.options, *msg.relation_ids)
    if isinstance(msg, Message):
        return (
            b"M" + _enc_xid(msg.xid) + struct.pack(">BQ", 1 if msg.transactional else 0, msg.lsn)
            + _cstr(msg.prefix) + struct.pack(">I", len(msg.content)) + msg.content
        )  # fmt: skip
    if isinstance(msg, StreamStart):
        return b"S" + _STREAM_START.pack(msg.xid, 1 if msg.first_segment else 0)
    if isinstance(msg, StreamStop):
        return b"E"
    if isinstance(msg, StreamCommit):
        return b"c" + _STREAM_COMMIT.pack(
            msg.xid, msg.flags, msg.commit_lsn, msg.end_lsn, msg.commit_ts
        )
    if isinstance(msg, StreamAbort):
        if msg.abort_lsn is not None:
            return b"A" + _STREAM_ABORT_V4.pack(
                msg.xid, msg.subxid, msg.abort_lsn, msg.abort_ts or 0
            )
        return b"A" + _STREAM_ABORT.pack(msg.xid, msg.subxid)
    raise TypeError(f"not a pgoutput message: {msg!r}")


# ------------------------------------------------- replication protocol framing


@dataclass(frozen=True, slots=True)
class XLogData:
    wal_start: int  # WAL position of the payload (for pgoutput: the change's LSN)
    wal_end: int  # current end of WAL on the server
    server_time: int  # microseconds since 2000-01-01
    payload: bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    wal_end: int
    server_time: int
    reply_requested: bool


_XLOG_HEADER = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")


def parse_copy_data(data: bytes | bytearray | memoryview) -> XLogData | PrimaryKeepalive:
    """One CopyData payload from START_REPLICATION: 'w' XLogData or 'k' keepalive."""
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise PgOutputError("empty CopyData message: expected 'w' (XLogData) or 'k' (keepalive)")
    t = buf[0]
    if t == 0x77:
        if len(buf) < 1 + _XLOG_HEADER.size:
            raise PgOutputError(
                f"XLogData message is {len(buf)} bytes: expected at least 25 "
                "(Int64 start, Int64 end, Int64 server time) before the payload"
            )
        start, end, ts = _XLOG_HEADER.unpack_from(buf, 1)
        return XLogData(start, end, ts, buf[25:])
    if t == 0x6B:
        if len(buf) != 1 + _KEEPALIVE.size:
            raise PgOutputError(
                f"primary keepalive message is {len(buf)} bytes: expected 18 "
                "(Int64 end of WAL, Int64 server time, Byte1 reply requested)"
            )
        end, ts, reply = _KEEPALIVE.unpack_from(buf, 1)
        return PrimaryKeepalive(end, ts, reply == 1)
    raise PgOutputError(
        f"unknown replication CopyData message type {t:#04x} at offset 0: "
        "expected 'w' (XLogData) or 'k' (primary keepalive)"
    )


def standby_status_update(
    write_lsn: int,
    flush_lsn: int | None = None,
    apply_lsn: int | None = None,
    *,
    client_time_us: int | None = None,
    reply_requested: bool = False,
) -> bytes:
    """The 'r' CopyData message that reports (and for logical slots, confirms) progress.

    The LSNs are "the last WAL byte + 1" received / flushed / applied; for a
    logical slot the flush LSN becomes confirmed_flush_lsn, so pass the
    end_lsn of the last transaction the downstream has durably published.
    ``flush_lsn``/``apply_lsn`` default to ``write_lsn``.
    """
    flush = write_lsn if flush_lsn is None else flush_lsn
    apply = flush if apply_lsn is None else apply_lsn
    now = pg_now_us() if client_time_us is None else client_time_us
    return _STATUS.pack(b"r", write_lsn, flush, apply, now, 1 if reply_requested else 0)


def pg_now_us() -> int:
    """Now, as microseconds since 2000-01-01 UTC (the protocol's clock)."""
    return time.time_ns() // 1000 - PG_EPOCH_UNIX_US


def pg_us_to_unix_ms(pg_us: int) -> int:
    """Postgres TimestampTz (us since 2000-01-01) -> milliseconds since the Unix epoch."""
    return (pg_us + PG_EPOCH_UNIX_US) // 1000
