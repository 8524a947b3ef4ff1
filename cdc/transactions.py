"""Transaction assembly, sans-I/O: pgoutput payloads in stream order -> what downstream needs.

Feed ``(wal_lsn, payload)`` pairs (XLogData ``wal_start`` and ``payload``) to
:meth:`TransactionAssembler.feed`; it returns the items to publish, in order:
:class:`TransactionStart`, :class:`~cdc.changes.RowChange` (fully stamped),
:class:`LogicalMessage`, :class:`TransactionEnd`.

Ordinary transactions are already committed when pgoutput sends them (the
server decodes at commit), so their changes pass straight through: O(1) work
and memory per change.

Streamed transactions (protocol v2, ``streaming on``) arrive in pieces while
still running and may abort, so nothing of them is emitted before Stream
Commit. Their raw messages are spooled to one file per transaction
(length-prefixed, with the change's WAL position), never held in memory, and
replayed in order at Stream Commit. A Stream Abort of a subtransaction
truncates the spool back to that subtransaction's first message - what
Postgres' own apply worker does (worker.c, stream_abort) - since pgoutput
sends the subtransaction's xid on each streamed message.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, TypeAlias

from cdc.changes import ChangeBuilder, RowChange
from cdc.pgoutput import (
    PG_EPOCH_UNIX_US,
    Message,
    PgOutputError,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    Truncate,
    Type,
    decode_message,
    pg_us_to_unix_ms,
    unpack_begin,
    unpack_commit,
)

__all__ = [
    "AssembledItem",
    "LogicalMessage",
    "TransactionAssembler",
    "TransactionEnd",
    "TransactionStart",
]


@dataclass(slots=True)
class TransactionStart:
    xid: int
    commit_lsn: int
    commit_ts_ms: int
    streamed: bool


@dataclass(slots=True)
class TransactionEnd:
    """The transaction is complete; once everything before it is published, confirm ``end_lsn``."""

    xid: int
    commit_lsn: int
    end_lsn: int  # flush LSN to report to the server (end of the commit record)
    commit_ts_ms: int
    changes: int  # number of RowChanges emitted for it


@dataclass(slots=True)
class LogicalMessage:
    """pg_logical_emit_message(): inside a transaction when transactional, else on its own."""

    prefix: str
    content: bytes
    lsn: int
    transactional: bool
    txid: int  # 0 when not transactional
    commit_lsn: int  # 0 when not transactional
    commit_ts_ms: int  # 0 when not transactional


AssembledItem: TypeAlias = TransactionStart | RowChange | LogicalMessage | TransactionEnd

_RECORD = struct.Struct(">QI")  # WAL position of the message, payload length
_XID = struct.Struct(">I")
# Inside a stream block every message but Stream Stop carries the (sub)xid at offset 1.
_STREAMABLE: Final = frozenset(b"IUDTRYM")
_SCHEMA: Final = frozenset(b"RY")
_ROW_TYPES: Final = frozenset(b"IUD")
_NONE: Final[tuple[()]] = ()


class _Spool:
    """One streamed transaction's messages on disk."""

    __slots__ = ("file", "path", "size", "subxacts")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 - lives until commit/abort
        self.size = 0
        self.subxacts: dict[int, int] = {}  # subxid -> offset of its first message

    def append(self, wal_lsn: int, payload: bytes) -> None:
        self.file.write(_RECORD.pack(wal_lsn, len(payload)))
        self.file.write(payload)
        self.size += _RECORD.size + len(payload)

    def truncate(self, offset: int) -> None:
        """Drop everything from ``offset`` on, keeping Relation/Type messages found there.

        Keeping them is safe (a later schema change makes pgoutput send a new
        Relation) and needed: pgoutput will not resend a Relation it already
        sent in this streamed transaction, even if that part was rolled back.
        """
        self.file.flush()
        kept = [(lsn, p) for lsn, p in _records(self.path, offset) if p[0] in _SCHEMA]
        self.file.truncate(offset)
        self.file.seek(offset)
        self.size = offset
        self.subxacts = {x: off for x, off in self.subxacts.items() if off < offset}
        for lsn, p in kept:
            self.append(lsn, p)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _records(path: Path, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(offset)
        read = f.read
        while header := read(_RECORD.size):
            if len(header) != _RECORD.size:
                raise PgOutputError(f"spool file {path} is truncated at a record header")
            lsn, n = _RECORD.unpack(header)
            payload = read(n)
            if len(payload) != n:
                raise PgOutputError(f"spool file {path} is truncated inside a record")
            yield lsn, payload


class TransactionAssembler:
    """Assemble pgoutput messages into transactions, spooling streamed ones to disk.

    ``spool_dir`` belongs to this assembler: leftover ``xid-*.spool`` files from
    a previous run are removed (after a restart the server resends every
    uncommitted transaction from its start).
    """

    def __init__(
        self, spool_dir: str | os.PathLike[str], builder: ChangeBuilder | None = None
    ) -> None:
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.spool_dir.glob("xid-*.spool"):
            stale.unlink()
        self.builder = builder if builder is not None else ChangeBuilder()
        self._spools: dict[int, _Spool] = {}
        self._stream: _Spool | None = None  # inside Stream Start .. Stream Stop
        self._stream_xid = 0
        # The ordinary transaction being passed through (between Begin and Commit).
        self._xid = 0
        self._commit_lsn = 0
        self._ts_ms = 0
        self._seq = 0
        self._in_tx = False
        self.last_end_lsn = 0  # end_lsn of the last TransactionEnd returned

    @property
    def in_transaction(self) -> bool:
        """Between Begin and Commit of an ordinary transaction."""
        return self._in_tx

    @property
    def open_streams(self) -> tuple[int, ...]:
        """Xids of streamed transactions spooled but not yet committed or aborted."""
        return tuple(self._spools)

    def close(self) -> None:
        """Remove all spool files (e.g. on shutdown: the server resends these transactions)."""
        for spool in self._spools.values():
            spool.discard()
        self._spools.clear()
        self._stream = None

    def feed(self, wal_lsn: int, payload: bytes) -> Iterable[AssembledItem]:
        """One pgoutput message with its WAL position; returns the items it completes.

        The result of a Stream Commit is a lazy replay of the spooled
        transaction: consume it fully before feeding the next message.
        """
        if self._stream is not None:
            return self._spool(wal_lsn, payload)
        t = payload[0] if payload else -1
        if t == 0x49 or t == 0x55 or t == 0x44:  # Insert / Update / Delete
            if not self._in_tx:
                raise PgOutputError(
                    f"row change at {wal_lsn:X} outside a transaction: expected Begin first "
                    "(start streaming from a transaction boundary)"
                )
            seq = self._seq
            self._seq = seq + 1
            return (
                self.builder.change(
                    payload, wal_lsn, self._commit_lsn, self._xid, seq, self._ts_ms
                ),
            )
        if t == 0x42:  # Begin
            final_lsn, commit_ts, xid = unpack_begin(payload)
            if self._in_tx:
                raise PgOutputError(
                    f"Begin of xid {xid} inside transaction {self._xid}: expected Commit"
                )
            self._in_tx = True
            self._xid, self._commit_lsn = xid, final_lsn
            self._ts_ms = ts_ms = (commit_ts + PG_EPOCH_UNIX_US) // 1000
            self._seq = 0
            return (TransactionStart(xid, final_lsn, ts_ms, False),)
        if t == 0x43:  # Commit
            _flags, commit_lsn, end_lsn, _ts = unpack_commit(payload)
            if not self._in_tx:
                raise PgOutputError(f"Commit at {commit_lsn:X} without Begin")
            self._in_tx = False
            self.last_end_lsn = end_lsn
            return (TransactionEnd(self._xid, commit_lsn, end_lsn, self._ts_ms, self._seq),)
        msg = decode_message(payload)
        if isinstance(msg, Relation):
            self.builder.add_relation(msg)
            return _NONE
        if isinstance(msg, Type):
            self.builder.add_type(msg)
            return _NONE
        if isinstance(msg, Truncate):
            changes = self.builder.truncate(
                msg, wal_lsn, self._commit_lsn, self._xid, self._seq, self._ts_ms
            )
            self._seq += len(changes)
            return changes
        if isinstance(msg, Message):
            if msg.transactional and self._in_tx:
                return (
                    LogicalMessage(
                        msg.prefix,
                        msg.content,
                        msg.lsn,
                        True,
                        self._xid,
                        self._commit_lsn,
                        self._ts_ms,
                    ),
                )
            return (LogicalMessage(msg.prefix, msg.content, msg.lsn, msg.transactional, 0, 0, 0),)
        if isinstance(msg, StreamStart):
            return self._stream_start(msg)
        if isinstance(msg, StreamCommit):
            return self._stream_commit(msg)
        if isinstance(msg, StreamAbort):
            self._stream_abort(msg)
            return _NONE
        # Origin (replicated-in transactions) carries nothing we publish; a Stream
        # Stop outside a stream is harmless.
        return _NONE

    # ---- streamed transactions

    def _stream_start(self, msg: StreamStart) -> Iterable[AssembledItem]:
        if self._in_tx:
            raise PgOutputError(f"Stream Start of xid {msg.xid} inside transaction {self._xid}")
        spool = self._spools.get(msg.xid)
        if spool is None or msg.first_segment:
            if spool is not None:
                spool.discard()
            spool = _Spool(self.spool_dir / f"xid-{msg.xid}.spool")
            self._spools[msg.xid] = spool
        self._stream = spool
        self._stream_xid = msg.xid
        return _NONE

    def _spool(self, wal_lsn: int, payload: bytes) -> Iterable[AssembledItem]:
        spool = self._stream
        assert spool is not None
        t = payload[0] if payload else -1
        if t == 0x45:  # Stream Stop
            if len(payload) != 1:
                raise PgOutputError("malformed Stream Stop message: expected 1 byte")
            spool.file.flush()
            self._stream = None
            return _NONE
        if t == 0x4F:  # Origin: follows the first Stream Start of a replicated-in transaction
            decode_message(payload)  # validated, nothing to publish
            return _NONE
        if t not in _STREAMABLE or len(payload) < 5:
            raise PgOutputError(
                f"unexpected message {payload[:16].hex()} at {wal_lsn:X} inside the stream block "
                f"of xid {self._stream_xid}: expected a row, schema or message with an xid, or Stream Stop"
            )
        (xid,) = _XID.unpack_from(payload, 1)
        if xid != self._stream_xid and xid not in spool.subxacts:
            spool.subxacts[xid] = spool.size
        spool.append(wal_lsn, bytes(payload))
        return _NONE

    def _stream_abort(self, msg: StreamAbort) -> None:
        spool = self._spools.get(msg.xid)
        if spool is None:
            return  # nothing of it was spooled (e.g. aborted before its first change)
        if msg.subxid == msg.xid:
            spool.discard()
            del self._spools[msg.xid]
            return
        offset = spool.subxacts.get(msg.subxid)
        if offset is not None:
            spool.truncate(offset)

    def _stream_commit(self, msg: StreamCommit) -> Iterator[AssembledItem]:
        spool = self._spools.pop(msg.xid, None)
        ts_ms = pg_us_to_unix_ms(msg.commit_ts)
        yield TransactionStart(msg.xid, msg.commit_lsn, ts_ms, True)
        seq = 0
        if spool is not None:
            spool.file.close()
            try:
                b = self.builder
                for wal_lsn, payload in _records(spool.path):
                    if payload[0] in _ROW_TYPES:
                        yield b.change(
                            payload, wal_lsn, msg.commit_lsn, msg.xid, seq, ts_ms, in_stream=True
                        )
                        seq += 1
                        continue
                    m = decode_message(payload, in_stream=True)
                    if isinstance(m, Relation):
                        b.add_relation(m)
                    elif isinstance(m, Type):
                        b.add_type(m)
                    elif isinstance(m, Truncate):
                        changes = b.truncate(m, wal_lsn, msg.commit_lsn, msg.xid, seq, ts_ms)
                        seq += len(changes)
                        yield from changes
                    elif isinstance(m, Message):
                        yield LogicalMessage(
                            m.prefix, m.content, m.lsn, True, msg.xid, msg.commit_lsn, ts_ms
                        )
            finally:
                spool.path.unlink(missing_ok=True)
        self.last_end_lsn = msg.end_lsn
        yield TransactionEnd(msg.xid, msg.commit_lsn, msg.end_lsn, ts_ms, seq)
