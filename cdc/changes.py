"""Row changes: pgoutput Relation + Insert/Update/Delete/Truncate -> RowChange.

The relation cache lives here: pgoutput sends a Relation message before the
first change of a table and again whenever its schema changed (ADD/DROP
COLUMN, ALTER TYPE), so the newest Relation for an id always describes the
tuples that follow it. Column converters are chosen once per Relation.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, Final

from cdc.pgoutput import (
    UNCHANGED_TOAST,
    Delete,
    Insert,
    PgOutputError,
    Relation,
    RowSpec,
    Truncate,
    Type,
    Update,
    decode_row_change,
)
from cdc.values import Converter, converter_for

__all__ = ["ChangeBuilder", "RelationInfo", "RowChange", "UnknownRelationError"]

_EMPTY: Final[tuple[str, ...]] = ()
_OPS: Final = {"I": "c", "U": "u", "D": "d"}


@dataclass(slots=True)
class RowChange:
    op: str  # "c" insert, "u" update, "d" delete, "r" snapshot read, "t" truncate
    schema: str
    table: str
    key: tuple[str, ...]  # replica-identity key column names of the table
    before: dict[str, Any] | None  # JSON-ready values; None if not sent
    after: dict[str, Any] | None  # unchanged-TOAST columns are ABSENT from after
    unavailable: tuple[str, ...]  # names of unchanged TOAST columns
    unconverted: tuple[str, ...]  # columns whose text could not be converted (kept as raw text)
    lsn: int  # WAL position of this change (snapshot reads: the snapshot LSN)
    commit_lsn: int  # commit LSN of its transaction (snapshot: the snapshot LSN)
    txid: int  # 0 for snapshot reads
    seq: int  # position of the change in its transaction, 0-based
    commit_ts_ms: int  # commit timestamp, ms since epoch UTC
    snapshot: str | None  # None when streamed; "initial" / "incremental" for reads

    def envelope(self) -> dict[str, Any]:
        """The Debezium-style change envelope that goes into an event's ``changes``."""
        # Built once per published change: LSNs are formatted inline (as format_lsn
        # does, without its range check: they come from the server).
        lsn, commit_lsn = self.lsn, self.commit_lsn
        source = {
            "lsn": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}",
            "commit_lsn": f"{commit_lsn >> 32:X}/{commit_lsn & 0xFFFFFFFF:X}",
            "txid": self.txid,
            "seq": self.seq,
            "schema": self.schema,
            "table": self.table,
            "snapshot": self.snapshot,
            "ts_ms": self.commit_ts_ms,
        }
        if self.unconverted:
            return {
                "op": self.op,
                "before": self.before,
                "after": self.after,
                "unavailable": list(self.unavailable),
                "unconverted": list(self.unconverted),
                "source": source,
            }
        return {
            "op": self.op,
            "before": self.before,
            "after": self.after,
            "unavailable": list(self.unavailable),
            "source": source,
        }


class UnknownRelationError(PgOutputError):
    """A change referenced a relation id no Relation message has described."""


@dataclass(slots=True)
class RelationInfo:
    """A Relation message prepared for decoding: names, key and one converter per column."""

    relation: Relation
    schema: str
    table: str
    names: tuple[str, ...]
    key: tuple[str, ...]
    key_index: tuple[int, ...]
    converters: tuple[Converter, ...]

    @property
    def spec(self) -> RowSpec:
        return self.names, self.converters


class _Specs(dict[int, RowSpec]):
    """relation id -> (names, converters); a miss is the named error, not a KeyError."""

    __slots__ = ("_builder",)

    def __init__(self, builder: ChangeBuilder) -> None:
        super().__init__()
        self._builder = builder

    def __missing__(self, relation_id: int) -> RowSpec:
        return self._builder.relation(relation_id).spec  # raises UnknownRelationError


def _b64(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).decode("ascii")


class ChangeBuilder:
    """Turns decoded pgoutput row messages into RowChanges, holding the relation cache."""

    __slots__ = ("_specs", "primary_keys", "relations", "types")

    def __init__(self, primary_keys: dict[tuple[str, str], tuple[str, ...]] | None = None) -> None:
        # Under REPLICA IDENTITY FULL pgoutput flags every column as key; the
        # table's primary key (from the catalog) is what identifies its rows.
        self.primary_keys = primary_keys or {}
        self.relations: dict[int, RelationInfo] = {}
        self.types: dict[int, Type] = {}
        self._specs = _Specs(self)

    # ---- schema messages

    def add_type(self, msg: Type) -> None:
        """Remember a user type's name (sent before a Relation that uses it)."""
        self.types[msg.type_oid] = msg

    def add_relation(self, msg: Relation) -> RelationInfo:
        """A (new) description of a relation: replaces any earlier one for the same id."""
        convs = []
        for col in msg.columns:
            t = self.types.get(col.type_oid)
            convs.append(converter_for(col.type_oid, col.type_modifier, t.name if t else None))
        names = tuple(c.name for c in msg.columns)
        key_index = tuple(i for i, c in enumerate(msg.columns) if c.flags & 1)
        # pgoutput sends pg_catalog as "", never a user schema
        schema = msg.namespace or "pg_catalog"
        key = tuple(names[i] for i in key_index)
        if msg.replica_identity == "f":
            pk = self.primary_keys.get((schema, msg.name))
            if pk and all(k in names for k in pk):
                key = pk
        info = RelationInfo(
            relation=msg,
            schema=schema,
            table=msg.name,
            names=names,
            key=key,
            key_index=key_index,
            converters=tuple(convs),
        )
        self.relations[msg.relation_id] = info
        self._specs[msg.relation_id] = info.spec
        return info

    def relation(self, relation_id: int) -> RelationInfo:
        try:
            return self.relations[relation_id]
        except KeyError:
            raise UnknownRelationError(
                f"change for relation id {relation_id} arrived before any Relation message "
                "describing it; pgoutput sends one before a table's first change, so the "
                "stream was not read from a transaction boundary (or a Relation was lost)"
            ) from None

    # ---- row messages

    def change(
        self,
        data: bytes,
        lsn: int,
        commit_lsn: int,
        txid: int,
        seq: int,
        commit_ts_ms: int,
        *,
        in_stream: bool = False,
    ) -> RowChange:
        """Raw Insert/Update/Delete bytes -> RowChange in one pass (the hot path).

        Same result as decode_message() followed by insert()/update()/delete().
        """
        t, rel_id, old_kind, old, new = decode_row_change(
            data, self._specs.__getitem__, in_stream=in_stream
        )
        info = self.relations[rel_id]
        before = None
        if new is not None:
            after, unavailable, unconverted, _ = new
        else:
            after, unavailable, unconverted = None, None, None
        if old is not None:
            before, old_unavailable, old_unconverted, _ = old
            if old_kind == "K":
                # only the key columns carry values; the rest are sent as nulls
                before = {name: before[name] for name in info.key if name in before}
                old_unavailable = old_unconverted = None
            if old_unavailable:
                unavailable = _merge(unavailable, old_unavailable)
            if old_unconverted:
                unconverted = _merge(unconverted, old_unconverted)
        return RowChange(
            _OPS[t], info.schema, info.table, info.key, before, after,
            tuple(unavailable) if unavailable else _EMPTY,
            tuple(unconverted) if unconverted else _EMPTY,
            lsn, commit_lsn, txid, seq, commit_ts_ms, None,
        )  # fmt: skip

    def _row(
        self,
        info: RelationInfo,
        values: tuple[Any, ...],
        only: tuple[int, ...] | None = None,
    ) -> tuple[dict[str, Any], list[str] | None, list[str] | None]:
        names = info.names
        if len(values) != len(names):
            raise PgOutputError(
                f"tuple for {info.schema}.{info.table} has {len(values)} columns but its "
                f"Relation message lists {len(names)}; the relation cache is out of step with "
                "the stream (was a Relation message skipped?)"
            )
        row: dict[str, Any] = {}
        unavailable: list[str] | None = None
        unconverted: list[str] | None = None
        if only is None:
            columns: Any = zip(names, info.converters, values, strict=False)
        else:
            convs = info.converters
            columns = [(names[i], convs[i], values[i]) for i in only]
        for name, conv, v in columns:
            if v.__class__ is bytes:
                try:
                    row[name] = conv(v)
                except Exception:  # an unreadable value is kept as text, never lost
                    row[name] = v.decode("utf-8", "replace")
                    if unconverted is None:
                        unconverted = []
                    unconverted.append(name)
            elif v is None:
                row[name] = None
            elif v is UNCHANGED_TOAST:
                if unavailable is None:
                    unavailable = []
                unavailable.append(name)
            else:  # Binary: sent only with the binary option; kept as base64 and flagged
                row[name] = _b64(v)
                if unconverted is None:
                    unconverted = []
                unconverted.append(name)
        return row, unavailable, unconverted

    def insert(
        self, msg: Insert, lsn: int, commit_lsn: int, txid: int, seq: int, commit_ts_ms: int
    ) -> RowChange:
        info = self.relation(msg.relation_id)
        after, unavailable, unconverted = self._row(info, msg.new)
        return RowChange(
            "c", info.schema, info.table, info.key, None, after,
            tuple(unavailable) if unavailable else _EMPTY,
            tuple(unconverted) if unconverted else _EMPTY,
            lsn, commit_lsn, txid, seq, commit_ts_ms, None,
        )  # fmt: skip

    def update(
        self, msg: Update, lsn: int, commit_lsn: int, txid: int, seq: int, commit_ts_ms: int
    ) -> RowChange:
        info = self.relation(msg.relation_id)
        after, unavailable, unconverted = self._row(info, msg.new)
        before = None
        if msg.old is not None:
            # 'K': only the key columns carry values (the rest are sent as nulls);
            # 'O' (REPLICA IDENTITY FULL): the whole old row.
            only = info.key_index if msg.old_kind == "K" else None
            before, old_unavailable, old_unconverted = self._row(info, msg.old, only)
            unavailable = _merge(unavailable, old_unavailable)
            unconverted = _merge(unconverted, old_unconverted)
        return RowChange(
            "u", info.schema, info.table, info.key, before, after,
            tuple(unavailable) if unavailable else _EMPTY,
            tuple(unconverted) if unconverted else _EMPTY,
            lsn, commit_lsn, txid, seq, commit_ts_ms, None,
        )  # fmt: skip

    def delete(
        self, msg: Delete, lsn: int, commit_lsn: int, txid: int, seq: int, commit_ts_ms: int
    ) -> RowChange:
        info = self.relation(msg.relation_id)
        only = info.key_index if msg.old_kind == "K" else None
        before, unavailable, unconverted = self._row(info, msg.old, only)
        return RowChange(
            "d", info.schema, info.table, info.key, before, None,
            tuple(unavailable) if unavailable else _EMPTY,
            tuple(unconverted) if unconverted else _EMPTY,
            lsn, commit_lsn, txid, seq, commit_ts_ms, None,
        )  # fmt: skip

    def truncate(
        self, msg: Truncate, lsn: int, commit_lsn: int, txid: int, seq: int, commit_ts_ms: int
    ) -> list[RowChange]:
        """One op="t" RowChange per truncated relation, numbered from ``seq``."""
        out = []
        for i, rel_id in enumerate(msg.relation_ids):
            info = self.relation(rel_id)
            change = RowChange(
                "t", info.schema, info.table, info.key, None, None, _EMPTY, _EMPTY,
                lsn, commit_lsn, txid, seq + i, commit_ts_ms, None,
            )  # fmt: skip
            out.append(change)
        return out


def _merge(a: list[str] | None, b: list[str] | None) -> list[str] | None:
    if not b:
        return a
    if not a:
        return b
    return a + [n for n in b if n not in a]
