"""Redis user views: per customer and per order, for the app's point reads.

Python digests a batch of domain events into compact row writes (one op per
row change in the events' ``changes``, a row's writes in one batch merged where
the newest stands for them all); one Lua script (projections/lua/apply.lua)
applies them and the batch's Kafka positions in a single EVALSHA (a batch of
more than CHUNK_OPS ops: one per part, pipelined, the positions with the last),
guarded by row version, so a replayed or older event never moves a view
backwards or counts twice. docs/redis-views.md describes the keys.

The views are projected from the row images of the envelopes, not from the
event types: every event type of the catalogue (snapshot reads, deletes,
truncates, generic Row* events) is covered by what its changes do to the
customers, orders, order_items and payments tables. Other tables (products,
tables unknown to the catalogue) do not feed these views; their events are
accepted and ignored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from cdc.events import DomainEvent
from projections.positions import Position, PositionKey, min_watermark
from projections.redis_reads import ReadConnections

__all__ = ["STATUSES", "RedisViews", "RedisViewsError"]

STATUSES: Final = ("pending", "paid", "shipped", "cancelled", "refunded")
# Ops per script: a batch of more is applied as several scripts sent in one pipeline
# (one round trip), so that reads wait for one part, never for a whole large batch.
CHUNK_OPS: Final = 1000
RECENT: Final = 20  # orders in a customer's recent list (apply.lua trims to it)

_LUA = Path(__file__).with_name("lua")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_dumps = orjson.dumps
_SEP: Final = "\x1f"  # ends every field of a batch (see apply.lua)
_loads = orjson.loads


class RedisViewsError(ValueError):
    """An event carries a value the views cannot hold exactly."""


def _micros(ts: Any) -> str:
    """A timestamptz as µs since the epoch (exact in a Lua double until 2255); "" if none."""
    if ts.__class__ is not str:
        return ""
    try:
        delta = datetime.fromisoformat(ts) - _EPOCH
    except (TypeError, ValueError):
        return ""
    return str((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)


def _cents(amount: Any) -> int:
    """A numeric(12,2) string -> integer cents, exactly (never through a float)."""
    if amount.__class__ is str:
        whole, dot, frac = amount.partition(".")
        if dot and len(frac) == 2 and frac.isdigit() and whole.lstrip("-").isdigit():
            cents = int(whole) * 100 + int(frac) * (-1 if whole.startswith("-") else 1)
            return cents
    try:
        value = Decimal(_id(amount)) * 100
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value():
        raise RedisViewsError(
            f"payment amount {amount!r} is not a whole number of cents; the views keep "
            "money as integer cents (payments.amount is numeric(12,2))"
        )
    return int(value)


_NAIVE_EPOCH: Final = datetime(1970, 1, 1)


def _iso(micros: int) -> str:
    """µs since the epoch -> ISO 8601 UTC with 6 fraction digits and "Z"."""
    return (_NAIVE_EPOCH + timedelta(microseconds=micros)).isoformat(timespec="microseconds") + "Z"


def money(cents: int) -> str:
    """Integer cents -> the decimal string ("-12.05")."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{whole}.{frac:02d}"


def _id(value: Any) -> str:
    return value if value.__class__ is str else str(value)


def _row(fields: list[str], change: dict[str, Any], row: dict[str, Any]) -> tuple[Any, ...]:
    """Append the row as compact JSON, then its unavailable (unchanged TOAST) columns;
    returns its shape (the unavailable columns, then every column): only writes of one
    shape may be merged (see _merges)."""
    fields.append(_dumps(row).decode())
    names = change.get("unavailable")
    if names:
        fields.append(str(len(names)))
        fields += names
        return (*names, "", *row)
    fields.append("0")
    return ("", *row)


class _Order:
    """One order's ops in a batch: its row write (the newest, when merged), its payments
    and its items (the newest version of each), emitted as one G op."""

    __slots__ = ("items", "oid", "payments", "row", "shape")

    def __init__(self, oid: str) -> None:
        self.oid = oid
        self.row: list[str] = ["-"]
        self.shape: tuple[Any, ...] | None = None  # the row write's shape, None if none
        self.payments: dict[str, tuple[str, str]] = {}
        self.items: dict[str, tuple[str, str]] = {}


def _merges(old: list[str], old_shape: Any, new: list[str], new_shape: Any) -> bool:
    """Whether a newer upsert of a row may stand for both: apply.lua then ends in the same
    state as from the two in turn (guard, TOAST fill-in and all; docs/redis-views.md).
    True when both have one shape (the same unavailable columns, the same columns) and,
    for an order, the newer sets every field apply.lua derives from it (it keeps a
    stored one where a write has '') and names the same customer."""
    if new[0] == "C":  # C id rv act ...
        return old_shape == new_shape and new[2] > old[2]
    # O rv act cust status currency placed ...
    if old_shape != new_shape or new[1] <= old[1]:
        return False
    return "" not in new[3:7] and new[3] == old[3]


def _act(old: str, new: str) -> str:
    """The later of two activity times (µs since the epoch as text; '' for none)."""
    if not old:
        return new
    if not new:
        return old
    return new if int(new) > int(old) else old


def digest(
    events: Iterable[DomainEvent], fields: list[str], cuts: list[int] | None = None
) -> tuple[int, int]:
    """Append the ops of `events` to `fields` (apply.lua's layout).

    `cuts`, when given, receives the length of `fields` after every CHUNK_OPS ops: where
    the batch may be cut into parts, each applied by a script of its own.

    Writes of one row within the batch are merged where apply.lua would end in the
    same state from the newest alone (the newest version of each payment and item,
    an order's or customer's newest row write of the same shape, the latest activity):
    most of a busy order's events in a batch become one op. Ops of different rows
    commute; those of one row keep their order. Returns (row changes taken, those
    merged into a newer write of their row)."""
    dumps = _dumps
    ops = merged = 0
    slots: list[Any] = []  # _Order, or a customer op (list), in the order first met
    open_orders: dict[str, _Order] = {}  # the slot an order's next ops may merge into
    open_customers: dict[str, tuple[list[str], tuple[Any, ...] | None]] = {}
    for event in events:
        version = event.version
        for change in event.changes:
            source = change["source"]
            table = source["table"]
            if table not in _TABLES or source.get("schema", "public") != "public":
                continue
            op = change["op"]
            rv = f"{version:025d}{source['seq']:010d}"
            ops += 1
            if op == "t":
                slots.append(["T", table, rv])
                open_orders.clear()  # nothing merges across a truncate
                open_customers.clear()
                continue
            row = change["before"] if op == "d" else change["after"]
            if not row:
                continue
            if table == "customers":
                if (id_ := row.get("id")) is None:
                    continue
                cid = _id(id_)
                if op == "d":
                    slots.append(["c", cid, rv])
                    open_customers.pop(cid, None)
                    continue
                new = ["C", cid, rv, _micros(row.get("updated_at"))]
                shape: tuple[Any, ...] | None = _row(new, change, row)
                held = open_customers.get(cid)
                if held is not None and _merges(held[0], held[1], new, shape):
                    old = held[0]
                    new[3] = _act(old[3], new[3])
                    old[:] = new
                    merged += 1
                    continue
                slots.append(new)
                open_customers[cid] = (new, shape)
                continue
            # A payments delete under the default replica identity carries only
            # its id: without the order it cannot be placed (see docs).
            oid = row.get("id") if table == "orders" else row.get("order_id")
            if oid is None:
                continue
            oid = _id(oid)
            order = open_orders.get(oid)
            if table == "orders":
                shape = None
                if op == "d":
                    new = ["o", rv]
                else:
                    cust, status = row.get("customer_id"), row.get("status")
                    currency, placed = row.get("currency"), row.get("placed_at")
                    new = [
                        "O", rv, _micros(row.get("updated_at")),
                        "" if cust is None else _id(cust),
                        "" if status is None else _id(status),
                        "" if currency is None else _id(currency),
                        "" if placed is None else _micros(placed),
                    ]  # fmt: skip
                    shape = _row(new, change, row)
                if order is not None and order.shape is None and order.row[0] == "-":
                    order.row, order.shape = new, shape  # the slot had no row write yet
                    if new[0] == "o":
                        open_orders.pop(oid)  # a delete closes the slot
                elif (
                    order is not None
                    and shape is not None
                    and _merges(order.row, order.shape, new, shape)
                ):
                    new[2] = _act(order.row[2], new[2])
                    order.row, order.shape = new, shape
                    merged += 1
                else:
                    order = _Order(oid)
                    order.row, order.shape = new, shape
                    slots.append(order)
                    if new[0] == "o":
                        open_orders.pop(oid, None)
                    else:
                        open_orders[oid] = order
                continue
            if order is None:
                order = open_orders[oid] = _Order(oid)
                slots.append(order)
            if table == "order_items":
                if (line := row.get("line_no")) is None:
                    continue
                if op == "d":
                    item = ""
                else:
                    item = dumps({k: v for k, v in row.items() if k != "order_id"}).decode()
                line = _id(line)
                held_child = order.items.get(line)
                if held_child is None:
                    order.items[line] = (rv, item)
                else:  # the newer of two versions stands for both
                    merged += 1
                    if rv > held_child[0]:
                        order.items[line] = (rv, item)
            else:
                if (pid := row.get("id")) is None:
                    continue
                if op == "d":
                    cents = "D"
                else:
                    amount = _cents(row.get("amount", "0"))
                    cents = str(-amount if row.get("kind") == "refund" else amount)
                pid = _id(pid)
                held_child = order.payments.get(pid)
                if held_child is None:
                    order.payments[pid] = (rv, cents)
                else:
                    merged += 1
                    if rv > held_child[0]:
                        order.payments[pid] = (rv, cents)
    for n, slot in enumerate(slots):
        if cuts is not None and n and n % CHUNK_OPS == 0:
            cuts.append(len(fields))
        if slot.__class__ is not _Order:
            fields += slot
            continue
        fields += ("G", slot.oid, *slot.row)
        fields.append(str(len(slot.payments)))
        for pid, (rv, cents) in slot.payments.items():
            fields += (pid, rv, cents)
        fields.append(str(len(slot.items)))
        for line, (rv, item) in slot.items.items():
            fields += (line, rv, item)
    return ops, merged


_TABLES: Final = frozenset(("customers", "orders", "order_items", "payments"))


def _fields(flat: list[Any]) -> dict[str, Any]:
    return {_s(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _columns(fields: dict[str, Any]) -> dict[str, Any] | None:
    """A row's columns: @row plus those kept apart as c:<name>; None if absent or deleted."""
    if "@row" not in fields or "@del" in fields:
        return None
    row: dict[str, Any] = _loads(fields["@row"])
    for name, value in fields.items():
        if name.startswith("c:"):
            row[name[2:]] = _loads(value)
    row.pop("id", None)
    return row


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisViews:
    """The customer and order views in Redis, every key under ``{namespace}:``.

    `partitions`: the (topic, partition) pairs this projection consumes; one
    not stored yet counts as watermark 0, so watermark() cannot run ahead of it.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "rs",
        *,
        partitions: Iterable[PositionKey] | None = None,
        reads: ReadConnections | None = None,
    ) -> None:
        self.client = client
        self.reads = reads  # the query API's (projections/redis_reads.py); else the client's
        self.namespace = namespace
        self.partitions: set[PositionKey] = set(partitions or ())
        self.events_applied = 0  # every event handed to apply(), the ignored ones too
        self.ops_applied = 0
        self.ops_skipped = 0  # replayed or older row writes the guard refused
        self._apply = client.register_script((_LUA / "apply.lua").read_text())
        self._read_user = client.register_script((_LUA / "read_user.lua").read_text())
        self._read_order = client.register_script((_LUA / "read_order.lua").read_text())

    def prepare(self, events: list[DomainEvent]) -> list[str]:
        """The batch's ops in apply.lua's layout, in parts of at most CHUNK_OPS ops (the
        digest: Python work only)."""
        fields: list[str] = []
        cuts: list[int] = []
        digest(events, fields, cuts)
        if not fields:
            return [""]
        parts, start = [], 0
        for end in [*cuts, len(fields)]:  # cuts fall between ops: never at 0 or the end
            parts.append(_SEP.join(fields[start:end]) + _SEP)
            start = end
        return parts

    async def apply(
        self,
        events: list[DomainEvent],
        positions: dict[PositionKey, Position],
        prepared: list[str] | None = None,
    ) -> None:
        """Apply a batch and store its positions, in one round trip: one EVALSHA, atomic
        in Redis, or for a batch of more than CHUNK_OPS ops one per part, pipelined.

        The positions go with the last part, and a part runs only if the one before it
        succeeded (apply.lua's gate): a part that fails leaves the positions where they
        were, so the batch is delivered again, and the guards make what the parts before
        it applied harmless to apply again. A reader may see a batch's first parts
        before its last; a read with min_lsn waits for its positions.

        `prepared`: prepare(events), when it was done ahead (the pipeline digests
        the next batch while Redis applies this one)."""
        head: list[str] = [str(len(positions))]
        for (topic, partition), pos in positions.items():
            head += (f"{topic}:{partition}", f"{pos.offset:020d}", f"{pos.watermark:020d}")
        parts = self.prepare(events) if prepared is None else prepared
        last = _SEP.join(head) + _SEP + parts[-1]
        if len(parts) == 1:
            results = [await self._apply(args=[self.namespace, last])]
        else:
            results = await self._apply_parts(parts, last)
        self.events_applied += len(events)
        for applied, skipped in results:
            self.ops_applied += int(applied)
            self.ops_skipped += int(skipped)

    async def _apply_parts(self, parts: list[str], last: str) -> list[Any]:
        """The parts as EVALSHAs in one pipeline: one round trip (redis-py's Script on a
        pipeline would ask SCRIPT EXISTS first, a second one). If Redis lost the script
        (a restart), no part ran past the gate: load it, send the batch again."""
        n = len(parts)
        for attempt in (1, 2):
            gate = uuid.uuid4().hex
            async with self.client.pipeline(transaction=False) as pipe:
                for k, ops in enumerate(parts[:-1], 1):
                    pipe.evalsha(self._apply.sha, 0, self.namespace, "0" + _SEP + ops, gate, k, n)
                pipe.evalsha(self._apply.sha, 0, self.namespace, last, gate, n, n)
                results: list[Any] = await pipe.execute(raise_on_error=False)
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                return results
            if attempt == 1 and any(isinstance(e, NoScriptError) for e in errors):
                await self.client.script_load(self._apply.script)
                continue
            raise errors[0]  # the part that failed: those after it refused
        raise AssertionError("unreachable")

    async def _read(self, script: AsyncScript, key: str) -> Any:
        if self.reads is not None:
            return await self.reads.evalsha(script, self.namespace, key)
        return await script(args=[self.namespace, key])

    async def user(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's view, JSON-ready; None when nothing is known of it."""
        reply = await self._read(self._read_user, customer_id)
        if reply is None:
            return None
        flat, ids, rows, last = reply
        fields = _fields(flat)
        counts = dict.fromkeys(STATUSES, 0)
        spend: dict[str, str] = {}
        for name, value in fields.items():
            if name.startswith("@n:"):
                counts[name[3:]] = int(value)
            elif name.startswith("@spend:") and int(value):
                spend[name[7:]] = money(int(value))
        recent = []
        for oid, (status, row_json) in zip(ids, rows, strict=True):
            row = _loads(row_json) if row_json is not None else {}
            recent.append({
                "order_id": _s(oid),
                "status": None if status is None else _s(status),
                "total": row.get("total"),
                "currency": row.get("currency"),
                "placed_at": row.get("placed_at"),
            })  # fmt: skip
        return {
            "customer_id": customer_id,
            "profile": _columns(fields),
            "order_counts": counts,
            "orders": sum(counts.values()),
            "lifetime_spend": dict(sorted(spend.items())),
            "recent_orders": recent,
            "last_activity": None if last is None else _iso(int(float(last))),
        }

    async def order(self, order_id: str) -> dict[str, Any] | None:
        """The order's view with its items, JSON-ready; None for an unknown or deleted order."""
        flat = await self._read(self._read_order, order_id)
        if flat is None:
            return None
        fields = _fields(flat)
        row = _columns(fields)
        if row is None:
            return None
        items = []
        for name, packed in fields.items():
            if name.startswith("i:"):
                item = _s(packed)[36:]
                if item:
                    items.append(_loads(item))
        items.sort(key=lambda item: item.get("line_no") or 0)
        return {
            "order_id": order_id,
            **row,
            "items": items,
            "net_paid": money(int(fields.get("@paid", 0))),
        }

    async def positions(self) -> dict[PositionKey, Position]:
        """Offset and watermark per (topic, partition), as stored with the views."""
        stored = await self.client.hgetall(f"{self.namespace}:positions")
        out: dict[PositionKey, Position] = {}
        for field, value in stored.items():
            topic, _, partition = _s(field).rpartition(":")
            offset, _, watermark = _s(value).partition(" ")
            out[(topic, int(partition))] = Position(int(offset), int(watermark))
        return out

    async def watermark(self) -> int:
        """The minimum over the partitions of their applied watermarks (0 if none)."""
        return min_watermark(await self.positions(), self.partitions)
