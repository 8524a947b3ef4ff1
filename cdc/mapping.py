"""Row changes of one committed transaction -> domain events (sans-I/O).

Feed a transaction with begin() / add() / end(); events come back from add()
(only when memory caps force an early emission) and end(). Changes are grouped
per aggregate within the transaction, so OrderPlaced can carry its items and
OrderPaid its payment; cdc/rules.py says which change becomes which event.

Memory stays bounded for huge transactions: at most `max_held_changes`
changes are held (the least recently touched aggregate is emitted early when
more arrive) and no event covers more than `max_changes_per_event` changes
(an order with more items continues in OrderItemsAdded events). Every change
still ends up in exactly one event, and the events of one aggregate come out
in increasing `version`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cdc.events import (
    SNAPSHOT_K,
    TABLE_WIDE_ID,
    DomainEvent,
    format_occurred_at,
    snapshot_event_id,
)
from cdc.lsn import format_lsn
from cdc.rules import AGGREGATES, EVENT_TYPES, GENERIC_EVENTS, Aggregate, Condition, EventType

if TYPE_CHECKING:
    from cdc.changes import RowChange

__all__ = ["MappingError", "TransactionMapper", "map_transaction"]

_K_MAX: Final = 0xFFFF  # k lives in the low 16 bits of version
_NO_EVENTS: Final[tuple[DomainEvent, ...]] = ()
_SCAN: Final = 8  # how far back (in events of one aggregate) a change looks for one to join


class MappingError(ValueError):
    """The mapper was fed something that breaks its contract."""


@dataclass(frozen=True, slots=True)
class _Rule:
    when: Condition | None
    spec: EventType
    joins: tuple[str, ...]


@dataclass(slots=True)
class _Table:
    """How changes of one table are routed: aggregate, id column, rules by op."""

    aggregate_type: str
    id_column: str | None  # None: generic table, the id is made of the key columns
    by_op: dict[str, tuple[_Rule, ...]]


class _Draft:
    """An event being assembled: the change that opened it and those folded in."""

    __slots__ = ("anchor", "joinable", "joined", "spec", "unsorted")

    def __init__(self, spec: EventType, anchor: RowChange, joinable: tuple[str, ...]) -> None:
        self.spec = spec
        self.anchor = anchor
        self.joined: list[RowChange] = []
        self.joinable = joinable  # event types this whole draft may be folded into
        self.unsorted = False


class _Group:
    """The open events of one aggregate in the current transaction."""

    __slots__ = ("aggregate_id", "aggregate_type", "drafts", "held", "k")

    def __init__(self, aggregate_type: str, aggregate_id: str, k: int) -> None:
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        self.drafts: list[_Draft] = []
        self.held = 0
        self.k = k  # the last k used for this aggregate in this transaction


def _compile(aggregates: Iterable[Aggregate]) -> dict[tuple[str, str], _Table]:
    tables: dict[tuple[str, str], _Table] = {}
    for agg in aggregates:
        for table, id_column in agg.tables.items():
            by_op: dict[str, list[_Rule]] = {}
            for rule in agg.rules:
                if rule.table not in agg.tables:
                    raise MappingError(
                        f"rule {rule} of aggregate {agg.name!r} names table {rule.table!r}, "
                        f"which is not one of its tables {sorted(agg.tables)}"
                    )
                if rule.table == table:
                    by_op.setdefault(rule.op, []).append(_rule(rule.event, rule.when, rule.joins))
            tables[(agg.schema, table)] = _Table(agg.name, id_column, _with_fallbacks(by_op))
    return tables


def _rule(event: str, when: Condition | None, joins: tuple[str, ...]) -> _Rule:
    try:
        spec = EVENT_TYPES[event]
    except KeyError:
        raise MappingError(f"rule names event type {event!r}, which EVENT_TYPES lacks") from None
    for name in joins:
        if name not in EVENT_TYPES:
            raise MappingError(f"rule joins event type {name!r}, which EVENT_TYPES lacks")
    return _Rule(when, spec, joins)


def _with_fallbacks(by_op: dict[str, list[_Rule]]) -> dict[str, tuple[_Rule, ...]]:
    """Every op ends in an unconditional rule, so every change gets an event."""
    out: dict[str, tuple[_Rule, ...]] = {}
    for op, generic in GENERIC_EVENTS.items():
        rules = by_op.get(op, [])
        if not rules or rules[-1].when is not None:
            rules = [*rules, _rule(generic, None, ())]
        out[op] = tuple(rules)
    return out


def _generic_table(schema: str, table: str) -> _Table:
    name = table if schema == "public" else f"{schema}.{table}"
    return _Table(name, None, _with_fallbacks({}))


class TransactionMapper:
    """Assembles the domain events of one transaction at a time (not thread-safe).

    Event ids, versions and grouping depend only on the transaction's changes
    and on the two caps, so a replay with the same caps yields the same events.
    """

    def __init__(
        self,
        *,
        max_changes_per_event: int = 500,
        max_held_changes: int = 20_000,
        max_tracked_aggregates: int = 10_000,
        aggregates: Iterable[Aggregate] = AGGREGATES,
    ) -> None:
        if max_changes_per_event < 1 or max_held_changes < max_changes_per_event:
            raise MappingError(
                f"caps must satisfy 1 <= max_changes_per_event ({max_changes_per_event}) "
                f"<= max_held_changes ({max_held_changes})"
            )
        self.max_changes_per_event = max_changes_per_event
        self.max_held_changes = max_held_changes
        self.max_tracked_aggregates = max_tracked_aggregates
        aggregates = tuple(aggregates)
        self._tables = _compile(aggregates)
        # Event types some rule folds changes into: only these look back for earlier events.
        self._absorbers = frozenset(
            name for agg in aggregates for rule in agg.rules for name in rule.joins
        )
        self._generic: dict[tuple[str, str], _Table] = {}
        self._groups: OrderedDict[tuple[str, str], _Group] = OrderedDict()
        self._last: _Group | None = None
        self._held = 0
        # k of aggregates emitted early in this transaction (they may come back);
        # beyond max_tracked_aggregates they are forgotten and `_k_floor` (the
        # largest forgotten k) is where any aggregate not tracked starts.
        self._k_seen: dict[tuple[str, str], int] = {}
        self._k_floor = 0
        self._open = False
        self._commit_lsn = -1  # no change matches until begin()
        self._lsn_text = ""
        self._version_base = 0
        self._occurred_at = ""
        self._ts_ms = -1
        self._snap_ts_ms = -1
        self._snap_occurred_at = ""

    # ---- transactions

    def begin(self, commit_lsn: int, commit_ts_ms: int, txid: int) -> None:
        """Start a committed transaction (pgoutput Begin: final LSN, commit time, xid).

        `txid` is not used: the changes carry it into their envelopes.
        """
        if self._open:
            raise MappingError(
                f"begin({format_lsn(commit_lsn)}) while the transaction committed at "
                f"{self._lsn_text} is still open; call end() first"
            )
        self._open = True
        self._commit_lsn = commit_lsn
        self._lsn_text = format_lsn(commit_lsn)
        self._version_base = commit_lsn << 16
        if commit_ts_ms != self._ts_ms:
            self._ts_ms = commit_ts_ms
            self._occurred_at = format_occurred_at(commit_ts_ms)

    def add(self, change: RowChange) -> tuple[DomainEvent, ...]:
        """Take the next change of the open transaction; returns events emitted early."""
        op = change.op
        if change.commit_lsn != self._commit_lsn or op == "r":
            if op == "r":
                return (self.snapshot(change),)
            self._check_open(change)
        table = self._tables.get((change.schema, change.table))
        if table is None:
            table = self._generic_route(change)
        if op == "t":
            return self._truncate(change, table)
        rules = table.by_op.get(op)
        if rules is None:
            raise MappingError(
                f"row change of {change.schema}.{change.table} (seq {change.seq}) has op "
                f"{op!r}; expected one of c, u, d, t (r goes to snapshot())"
            )
        row = change.after if change.after is not None else change.before
        id_column = table.id_column
        if id_column is not None:
            value = row.get(id_column) if row is not None else None
            if value is None:  # e.g. a payments delete with a key-only before-image
                table = self._generic_route(change)
                rules = table.by_op[op]
                aggregate_id = self._key_id(change, row)
            else:
                aggregate_id = value if value.__class__ is str else str(value)
        else:
            aggregate_id = self._key_id(change, row)

        group = self._last
        if (
            group is None
            or group.aggregate_id != aggregate_id
            or group.aggregate_type is not table.aggregate_type
        ):
            group = self._group(table.aggregate_type, aggregate_id)

        for rule in rules:
            if rule.when is None or rule.when(change):
                break
        if not rule.joins or not self._join(group, rule, change):
            if group.drafts and rule.spec.name in self._absorbers:
                self._absorb(rule, change, group.drafts)
            else:
                group.drafts.append(_Draft(rule.spec, change, rule.joins))
        group.held += 1
        self._held += 1
        if self._held > self.max_held_changes:
            return tuple(self._shrink())
        return _NO_EVENTS

    def _check_open(self, change: RowChange) -> None:
        if not self._open:
            raise MappingError(
                f"row change of {change.schema}.{change.table} (seq {change.seq}) arrived "
                "outside a transaction; call begin() first"
            )
        if change.commit_lsn != self._commit_lsn:
            raise MappingError(
                f"row change of {change.schema}.{change.table} (seq {change.seq}) belongs to "
                f"the transaction committed at {format_lsn(change.commit_lsn)}, but the open "
                f"one commits at {self._lsn_text}; call end() before the next begin()"
            )

    def end(self) -> list[DomainEvent]:
        """Close the transaction: every event not yet emitted, per aggregate in version order."""
        if not self._open:
            raise MappingError("end() without begin()")
        out: list[DomainEvent] = []
        for group in self._groups.values():
            self._flush(group, out)
        self._groups.clear()
        self._last = None
        self._held = 0
        self._k_seen.clear()
        self._k_floor = 0
        self._open = False
        self._commit_lsn = -1
        return out

    # ---- snapshots

    def snapshot(self, change: RowChange) -> DomainEvent:
        """A snapshot read (op "r") -> its one event, version (snapshot_lsn << 16) | 0."""
        if change.op != "r":
            raise MappingError(
                f"snapshot() takes snapshot reads (op 'r'), got op {change.op!r} for "
                f"{change.schema}.{change.table}; streamed changes go through begin/add/end"
            )
        table = self._tables.get((change.schema, change.table)) or self._generic_route(change)
        row = change.after if change.after is not None else (change.before or {})
        key = [row.get(name) for name in change.key] if change.key else [row]
        event_id = snapshot_event_id(change.lsn, change.schema, change.table, key)
        aggregate_id: str | None = None
        if table.id_column is not None:
            value = row.get(table.id_column)
            if value is not None:
                aggregate_id = value if value.__class__ is str else str(value)
            else:
                table = self._generic_route(change)
        if aggregate_id is None:
            aggregate_id = _join_key(change, row) if change.key else event_id
        for rule in table.by_op["r"]:
            if rule.when is None or rule.when(change):
                break
        if change.commit_ts_ms != self._snap_ts_ms:
            self._snap_ts_ms = change.commit_ts_ms
            self._snap_occurred_at = format_occurred_at(change.commit_ts_ms)
        return DomainEvent(
            event_id,
            rule.spec.name,
            rule.spec.version,
            table.aggregate_type,
            aggregate_id,
            (change.lsn << 16) | SNAPSHOT_K,
            self._snap_occurred_at,
            change.commit_lsn,
            rule.spec.build(change, []),
            [change.envelope()],
        )

    # ---- routing

    def _generic_route(self, change: RowChange) -> _Table:
        name = (change.schema, change.table)
        table = self._generic.get(name)
        if table is None:
            table = self._generic[name] = _generic_table(*name)
        return table

    def _key_id(self, change: RowChange, row: dict[str, Any] | None) -> str:
        """Generic aggregate id: the key values joined; keyless rows are each their own."""
        if change.key and row is not None:
            return _join_key(change, row)
        # No identity to keep in order (like Debezium's null key): the change is its own aggregate.
        return f"{self._lsn_text}:{change.seq}"

    # ---- grouping

    def _group(self, aggregate_type: str, aggregate_id: str) -> _Group:
        key = (aggregate_type, aggregate_id)
        group = self._groups.get(key)
        if group is None:
            k = self._k_seen.pop(key, self._k_floor)
            group = self._groups[key] = _Group(aggregate_type, aggregate_id, k)
        else:
            self._groups.move_to_end(key)
        self._last = group
        return group

    def _join(self, group: _Group, rule: _Rule, change: RowChange) -> bool:
        """Fold `change` into the newest open event of a type it joins, if that has room."""
        drafts = group.drafts
        cap = self.max_changes_per_event
        for i in range(len(drafts) - 1, max(len(drafts) - 1 - _SCAN, -1), -1):
            draft = drafts[i]
            if draft.spec.name in rule.joins:
                takes = draft.spec.takes
                if len(draft.joined) + 1 < cap and (takes is None or len(draft.joined) < takes):
                    draft.joined.append(change)
                    return True
                return False
        return False

    def _absorb(self, rule: _Rule, change: RowChange, drafts: list[_Draft]) -> None:
        """Open an event, folding in earlier ones that join its type (payment before status)."""
        draft = _Draft(rule.spec, change, rule.joins)
        name = draft.spec.name
        takes = draft.spec.takes
        cap = self.max_changes_per_event
        for i in range(len(drafts) - 1, max(len(drafts) - 1 - _SCAN, -1), -1):
            earlier = drafts[i]
            if name not in earlier.joinable:
                continue
            size = 1 + len(earlier.joined)
            joined = len(draft.joined) + size
            if joined + 1 > cap or (takes is not None and joined > takes):
                continue
            draft.joined.append(earlier.anchor)
            draft.joined.extend(earlier.joined)
            draft.unsorted = True
            del drafts[i]
        drafts.append(draft)

    def _shrink(self) -> list[DomainEvent]:
        """Emit the least recently touched aggregates until the held changes fit the cap."""
        out: list[DomainEvent] = []
        groups = self._groups
        while self._held > self.max_held_changes and groups:
            key, group = next(iter(groups.items()))
            self._flush(group, out)
            if group is self._last:
                break  # the only one left: keep it open (empty) so its k continues
            del groups[key]
            self._remember_k(key, group.k)
        return out

    def _remember_k(self, key: tuple[str, str], k: int) -> None:
        seen = self._k_seen
        if len(seen) >= self.max_tracked_aggregates:
            self._k_floor = max(self._k_floor, *seen.values())
            seen.clear()
        seen[key] = k

    def _flush(self, group: _Group, out: list[DomainEvent]) -> None:
        k = group.k
        base = self._version_base
        lsn_text = self._lsn_text
        for draft in group.drafts:
            k += 1
            if k > _K_MAX:
                raise MappingError(
                    f"transaction committed at {lsn_text} has more than {_K_MAX} events for "
                    f"{group.aggregate_type} {group.aggregate_id!r}; version = (commit_lsn << 16) "
                    "| k cannot number them. Raise max_changes_per_event so fewer, larger "
                    "events are needed"
                )
            anchor = draft.anchor
            joined = draft.joined
            if draft.unsorted:
                joined.sort(key=_seq)
                first = anchor if anchor.seq < joined[0].seq else joined[0]
                covered = sorted([anchor, *joined], key=_seq)
            elif joined:
                first = anchor
                covered = [anchor, *joined]
            else:
                first = anchor
                covered = [anchor]
            spec = draft.spec
            out.append(
                DomainEvent(
                    f"{lsn_text}:{first.seq}",
                    spec.name,
                    spec.version,
                    group.aggregate_type,
                    group.aggregate_id,
                    base | k,
                    self._occurred_at,
                    self._commit_lsn,
                    spec.build(anchor, joined),
                    [c.envelope() for c in covered],
                )
            )
        group.k = k
        self._held -= group.held
        group.held = 0
        group.drafts = []

    def _truncate(self, change: RowChange, table: _Table) -> tuple[DomainEvent, ...]:
        """A truncate empties the whole table: emit everything before it first, keeping order."""
        out: list[DomainEvent] = []
        for group in self._groups.values():
            self._flush(group, out)
            self._remember_k((group.aggregate_type, group.aggregate_id), group.k)
        self._groups.clear()
        self._last = None
        group = self._group(table.aggregate_type, TABLE_WIDE_ID)
        for rule in table.by_op["t"]:
            if rule.when is None or rule.when(change):
                break
        group.drafts.append(_Draft(rule.spec, change, ()))
        group.held += 1
        self._held += 1
        self._flush(group, out)
        return tuple(out)


def _seq(change: RowChange) -> int:
    return change.seq


def _join_key(change: RowChange, row: dict[str, Any]) -> str:
    key = change.key
    if len(key) == 1:
        value = row.get(key[0])
        return "" if value is None else str(value)
    return ",".join("" if (v := row.get(name)) is None else str(v) for name in key)


def map_transaction(
    changes: Iterable[RowChange], mapper: TransactionMapper | None = None
) -> Iterator[DomainEvent]:
    """All events of one transaction's changes (all with the same commit_lsn)."""
    mapper = mapper or TransactionMapper()
    it = iter(changes)
    first = next(it, None)
    if first is None:
        return
    mapper.begin(first.commit_lsn, first.commit_ts_ms, first.txid)
    yield from mapper.add(first)
    for change in it:
        yield from mapper.add(change)
    yield from mapper.end()
