"""Redis user views: per customer and per order, for the app's point reads.

Python digests a batch of domain events into compact row writes (one op per
row change in the events' ``changes``); one Lua script (projections/lua/apply.lua)
applies them and the batch's Kafka positions in a single EVALSHA, guarded by
row version, so a replayed or older event never moves a view backwards or
counts twice. docs/redis-views.md describes the keys.

The views are projected from the row images of the envelopes, not from the
event types: every event type of the catalogue (snapshot reads, deletes,
truncates, generic Row* events) is covered by what its changes do to the
customers, orders, order_items and payments tables. Other tables (products,
tables unknown to the catalogue) do not feed these views; their events are
accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as redis

from cdc.events import DomainEvent
from projections.positions import Position, PositionKey, min_watermark

__all__ = ["STATUSES", "RedisViews", "RedisViewsError"]

STATUSES: Final = ("pending", "paid", "shipped", "cancelled", "refunded")
RECENT: Final = 20  # orders in a customer's recent list (apply.lua trims to it)

_LUA = Path(__file__).with_name("lua")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_dumps = orjson.dumps
_loads = orjson.loads


class RedisViewsError(ValueError):
    """An event carries a value the views cannot hold exactly."""


def _text(value: Any) -> str:
    return value if value.__class__ is str else str(value)


def _activity(ts: Any) -> str:
    """A timestamptz ("...:SS[.f]Z") at fixed width, so Lua compares it as a string."""
    if ts.__class__ is not str:
        return ""
    n = len(ts)
    if n == 27:
        return ts
    if n == 20:
        return ts[:19] + ".000000Z"
    return ts[:-1].ljust(26, "0") + "Z"


def _micros(ts: Any) -> str:
    """placed_at as µs since the epoch: the score of the recent-orders list (exact in a double)."""
    if ts.__class__ is not str:
        return "0"
    try:
        delta = datetime.fromisoformat(ts) - _EPOCH
    except (TypeError, ValueError):
        return "0"
    return str((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)


def _cents(amount: Any) -> int:
    """A numeric(12,2) string -> integer cents, exactly (never through a float)."""
    if amount.__class__ is str:
        whole, dot, frac = amount.partition(".")
        if dot and len(frac) == 2 and frac.isdigit() and whole.lstrip("-").isdigit():
            cents = int(whole) * 100 + int(frac) * (-1 if whole.startswith("-") else 1)
            return cents
    try:
        value = Decimal(_text(amount)) * 100
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value != value.to_integral_value():
        raise RedisViewsError(
            f"payment amount {amount!r} is not a whole number of cents; the views keep "
            "money as integer cents (payments.amount is numeric(12,2))"
        )
    return int(value)


def money(cents: int) -> str:
    """Integer cents -> the decimal string ("-12.05")."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    return f"{sign}{whole}.{frac:02d}"


def _row_op(
    out: list[str],
    code: str,
    row: dict[str, Any],
    id_: str,
    rv: str,
    act: str,
    cust: str | None,
    unavailable: list[str],
) -> None:
    append = out.append
    append(code)
    append(id_)
    append(rv)
    append(act)
    if cust is not None:
        append(cust)
    at = len(out)
    append("")
    n = 0
    for name, value in row.items():
        if name != "id":
            append(name)
            append(_dumps(value).decode())
            n += 1
    if code == "O":
        placed = row.get("placed_at")
        if placed is not None:
            append("@ts")
            append(_micros(placed))
            n += 1
    out[at] = str(n)
    append(str(len(unavailable)))
    out.extend(unavailable)


def digest(events: Iterable[DomainEvent], out: list[str]) -> int:
    """Append the ops of `events` to `out` (the ARGV layout of apply.lua); returns their number."""
    ops = 0
    for event in events:
        version = f"{event.version:025d}"
        for change in event.changes:
            source = change["source"]
            table = source["table"]
            if table not in _TABLES or source.get("schema", "public") != "public":
                continue
            op = change["op"]
            rv = f"{version}{source['seq']:010d}"
            if op == "t":
                out += ("T", table, rv)
                ops += 1
                continue
            if op == "d":
                row = change["before"]
                if not row:
                    continue
                if table == "orders" or table == "customers":
                    id_ = row.get("id")
                    if id_ is None:
                        continue
                    out += ("o" if table == "orders" else "c", _text(id_), rv)
                else:
                    oid = row.get("order_id")
                    # A payments delete under the default replica identity carries
                    # only its id: without the order it cannot be placed (see docs).
                    if oid is None:
                        continue
                    key = row.get("line_no") if table == "order_items" else row.get("id")
                    if key is None:
                        continue
                    out += ("i" if table == "order_items" else "p", _text(oid), _text(key), rv)
                ops += 1
                continue
            row = change["after"]
            if not row:
                continue
            if table == "orders":
                id_ = row.get("id")
                if id_ is None:
                    continue
                cust = row.get("customer_id")
                _row_op(
                    out,
                    "O",
                    row,
                    _text(id_),
                    rv,
                    _activity(row.get("updated_at")),
                    "" if cust is None else _text(cust),
                    change.get("unavailable") or [],
                )
            elif table == "order_items":
                oid, line = row.get("order_id"), row.get("line_no")
                if oid is None or line is None:
                    continue
                item = {k: v for k, v in row.items() if k != "order_id"}
                out += ("I", _text(oid), _text(line), rv, _dumps(item).decode())
            elif table == "payments":
                oid, pid = row.get("order_id"), row.get("id")
                if oid is None or pid is None:
                    continue
                cents = _cents(row.get("amount", "0"))
                if row.get("kind") == "refund":
                    cents = -cents
                out += ("P", _text(oid), _text(pid), rv, str(cents))
            else:
                id_ = row.get("id")
                if id_ is None:
                    continue
                _row_op(
                    out,
                    "C",
                    row,
                    _text(id_),
                    rv,
                    _activity(row.get("updated_at")),
                    None,
                    change.get("unavailable") or [],
                )
            ops += 1
    return ops


_TABLES: Final = frozenset(("customers", "orders", "order_items", "payments"))


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
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.partitions: set[PositionKey] = set(partitions or ())
        self.events_applied = 0  # every event handed to apply(), the ignored ones too
        self.ops_applied = 0
        self.ops_skipped = 0  # replayed or older row writes the guard refused
        self._apply = client.register_script((_LUA / "apply.lua").read_text())
        self._read_user = client.register_script((_LUA / "read_user.lua").read_text())
        self._read_order = client.register_script((_LUA / "read_order.lua").read_text())

    async def apply(
        self, events: list[DomainEvent], positions: dict[PositionKey, Position]
    ) -> None:
        """Apply a batch and store its positions: one EVALSHA, atomic in Redis."""
        args: list[str] = [self.namespace, str(len(positions))]
        for (topic, partition), pos in positions.items():
            args += (f"{topic}:{partition}", f"{pos.offset:020d}", f"{pos.watermark:020d}")
        digest(events, args)
        applied, skipped = await self._apply(args=args)
        self.events_applied += len(events)
        self.ops_applied += int(applied)
        self.ops_skipped += int(skipped)

    async def user(self, customer_id: str) -> dict[str, Any] | None:
        """The customer's view, JSON-ready; None when nothing is known of it."""
        reply = await self._read_user(args=[self.namespace, customer_id])
        if reply is None:
            return None
        flat, ids, rows = reply
        profile: dict[str, Any] = {}
        counts = dict.fromkeys(STATUSES, 0)
        spend: dict[str, str] = {}
        last = None
        live = False
        deleted = False
        for i in range(0, len(flat), 2):
            name, value = _s(flat[i]), flat[i + 1]
            if name[0] != "@":
                profile[name] = _loads(value)
            elif name.startswith("@n:"):
                counts[name[3:]] = int(value)
            elif name.startswith("@spend:"):
                spend[name[7:]] = money(int(value))
            elif name == "@v":
                live = True
            elif name == "@del":
                deleted = True
            elif name == "@last":
                last = _s(value)
        recent = []
        for oid, (status, total, currency, placed_at) in zip(ids, rows, strict=True):
            recent.append({
                "order_id": _s(oid),
                "status": None if status is None else _loads(status),
                "total": None if total is None else _loads(total),
                "currency": None if currency is None else _loads(currency),
                "placed_at": None if placed_at is None else _loads(placed_at),
            })  # fmt: skip
        return {
            "customer_id": customer_id,
            "profile": profile if live and not deleted else None,
            "order_counts": counts,
            "orders": sum(counts.values()),
            "lifetime_spend": dict(sorted(spend.items())),
            "recent_orders": recent,
            "last_activity": last,
        }

    async def order(self, order_id: str) -> dict[str, Any] | None:
        """The order's view with its items, JSON-ready; None for an unknown or deleted order."""
        reply = await self._read_order(args=[self.namespace, order_id])
        if reply is None:
            return None
        flat, item_flat = reply
        view: dict[str, Any] = {"order_id": order_id}
        live = False
        paid = 0
        for i in range(0, len(flat), 2):
            name, value = _s(flat[i]), flat[i + 1]
            if name[0] != "@":
                view[name] = _loads(value)
            elif name == "@v":
                live = True
            elif name == "@del":
                return None
            elif name == "@paid":
                paid = int(value)
        if not live:
            return None
        items = []
        for i in range(0, len(item_flat), 2):
            packed = _s(item_flat[i + 1])
            if len(packed) > 36:
                items.append(_loads(packed[36:]))
        items.sort(key=lambda item: item.get("line_no") or 0)
        view["items"] = items
        view["net_paid"] = money(paid)
        return view

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
