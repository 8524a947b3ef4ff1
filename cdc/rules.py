"""The domain mapping, as a table: which row change becomes which domain event.

One block per aggregate. For a change, the first rule of its table and op
whose condition holds names the event type. A rule with `joins` folds its
change into an event of one of those types of the same aggregate and
transaction (OrderPlaced carries its order_items rows, OrderPaid its capture
payment); without such an event the change gets its own event. Every change
ends up in exactly one event (lossless), and a table or op without a rule
gets a generic Debezium-style event (RowInserted, RowUpdated, ...).

docs/events.md is the catalogue for consumers; bump an event type's
`version` whenever its `data` changes shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdc.changes import RowChange

__all__ = [
    "AGGREGATES",
    "EVENT_TYPES",
    "GENERIC_EVENTS",
    "Aggregate",
    "EventType",
    "Rule",
    "changed_fields",
]

Data = dict[str, Any]
Builder = Callable[["RowChange", "list[RowChange]"], Data]
Condition = Callable[["RowChange"], bool]


@dataclass(frozen=True, slots=True)
class Rule:
    """`table` `op` [when `when`] -> `event` (or folded into one of `joins`)."""

    table: str
    op: str
    event: str
    when: Condition | None = None
    joins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EventType:
    """An event type: its schema version and how its `data` is built.

    `build(anchor, joined)` gets the change that opened the event and the
    changes folded into it (in transaction order). `takes` caps how many
    changes may be folded in (None: up to the assembler's per-event cap).
    """

    name: str
    version: int
    build: Builder
    takes: int | None = None


@dataclass(frozen=True, slots=True)
class Aggregate:
    """An aggregate: its tables (table -> column holding the aggregate id) and rules."""

    name: str
    tables: dict[str, str]
    rules: tuple[Rule, ...]
    schema: str = "public"


# --- conditions ------------------------------------------------------------------


def status_to(status: str) -> Condition:
    """The update moved the order into `status`.

    With a before-image (REPLICA IDENTITY FULL) the old status decides. Under
    the default replica identity there is none; then the lifecycle timestamp
    of the new status (`paid_at`, ...) having been set by this very update
    (equal to `updated_at`) decides, which is how the writer's commands set them.
    """
    at = f"{status}_at"

    def when(change: RowChange) -> bool:
        after = change.after
        if after is None or after.get("status") != status:
            return False
        before = change.before
        if before is not None and "status" in before:
            return bool(before["status"] != status)
        stamp = after.get(at)
        return stamp is not None and stamp == after.get("updated_at")

    return when


def status_changed(change: RowChange) -> bool:
    """The old status is known and differs from the new one."""
    before, after = change.before, change.after
    return (
        before is not None
        and after is not None
        and "status" in before
        and "status" in after
        and before["status"] != after["status"]
    )


def value_changed(column: str) -> Condition:
    """Old and new value of `column` are both known and differ (needs a before-image)."""

    def when(change: RowChange) -> bool:
        before, after = change.before, change.after
        return (
            before is not None
            and after is not None
            and column in before
            and column in after
            and before[column] != after[column]
        )

    return when


def column_is(column: str, value: Any) -> Condition:
    def when(change: RowChange) -> bool:
        row = change.after if change.after is not None else change.before
        return row is not None and row.get(column) == value

    return when


# --- data builders ---------------------------------------------------------------


def row_of(change: RowChange) -> Data:
    """The row image a change carries: after, else before (deletes), else empty."""
    if change.after is not None:
        return change.after
    return change.before if change.before is not None else {}


def changed_fields(change: RowChange, key: tuple[str, ...] = ()) -> tuple[Data, Data]:
    """(changed, previous) of an update.

    changed: the fields of `after` whose old value differs, or is unknown (no
    before-image, or a key-only one); key columns count only when known to
    differ. Unchanged TOAST columns are absent from `after`, so never listed.
    previous: the old values of changed fields, where the before-image has them.
    """
    after = change.after or {}
    before = change.before
    changed: Data = {}
    previous: Data = {}
    if before is None:
        return {name: value for name, value in after.items() if name not in key}, previous
    for name, value in after.items():
        if name in before:
            old = before[name]
            if old != value:
                changed[name] = value
                previous[name] = old
        elif name not in key:
            changed[name] = value
    return changed, previous


def entity(id_name: str) -> Builder:
    """The full row, its `id` column renamed to `id_name` (created and snapshot events)."""

    def build(anchor: RowChange, joined: list[RowChange]) -> Data:
        row = row_of(anchor)
        data: Data = {id_name: row.get("id")}
        data.update(row)
        data.pop("id", None)
        return data

    return build


def entity_diff(id_name: str) -> Builder:
    """`id_name`, changed and previous (update events)."""

    def build(anchor: RowChange, joined: list[RowChange]) -> Data:
        changed, previous = changed_fields(anchor, ("id",))
        return {id_name: row_of(anchor).get("id"), "changed": changed, "previous": previous}

    return build


def only_id(id_name: str) -> Builder:
    def build(anchor: RowChange, joined: list[RowChange]) -> Data:
        return {id_name: row_of(anchor).get("id")}

    return build


def _item(change: RowChange) -> Data:
    return {k: v for k, v in row_of(change).items() if k != "order_id"}


_order_entity = entity("order_id")


def order_placed(anchor: RowChange, joined: list[RowChange]) -> Data:
    data = _order_entity(anchor, joined)
    data["items"] = [_item(c) for c in joined if c.table == "order_items"]
    return data


def order_items_added(anchor: RowChange, joined: list[RowChange]) -> Data:
    return {
        "order_id": row_of(anchor).get("order_id"),
        "items": [_item(anchor)] + [_item(c) for c in joined if c.table == "order_items"],
    }


def order_status(at: str | None, *, payment: bool = False, totals: bool = False, nested_payment: bool = False) -> Builder:
    """Status transitions: new and previous status, the lifecycle timestamp, the payment row."""

    def build(anchor: RowChange, joined: list[RowChange]) -> Data:
        after = anchor.after or {}
        before = anchor.before
        data: Data = {
            "order_id": after.get("id"),
            "status": after.get("status"),
            "previous_status": before.get("status") if before is not None else None,
        }
        if at is not None:
            data[at] = after.get(at)
        if totals:
            data["currency"] = after.get("currency")
            data["total"] = after.get("total")
        if payment:
            paid = next((row_of(c) for c in joined if c.table == "payments"), None)
            fields = {
                "payment_id": paid.get("id") if paid else None,
                "amount": paid.get("amount") if paid else None,
                "method": paid.get("method") if paid else None,
                "provider_ref": paid.get("provider_ref") if paid else None,
            }
            if nested_payment:
                # OrderPaid v2: the capture row grouped under `payment`, null without
                # one (v1 had the fields flat; projections/upcasting.py upcasts v1)
                data["payment"] = fields if paid else None
            else:
                data.update(fields)
        return data

    return build


def order_deleted(anchor: RowChange, joined: list[RowChange]) -> Data:
    return {
        "order_id": row_of(anchor).get("id"),
        "removed_items": [row_of(c).get("line_no") for c in joined if c.table == "order_items"],
        "removed_payments": [row_of(c).get("id") for c in joined if c.table == "payments"],
    }


def order_item_snapshot(anchor: RowChange, joined: list[RowChange]) -> Data:
    return dict(row_of(anchor))


def order_item_changed(anchor: RowChange, joined: list[RowChange]) -> Data:
    row = row_of(anchor)
    changed, previous = changed_fields(anchor, ("order_id", "line_no"))
    return {
        "order_id": row.get("order_id"),
        "line_no": row.get("line_no"),
        "changed": changed,
        "previous": previous,
    }


def order_item_removed(anchor: RowChange, joined: list[RowChange]) -> Data:
    row = row_of(anchor)
    return {"order_id": row.get("order_id"), "line_no": row.get("line_no")}


def payment(anchor: RowChange, joined: list[RowChange]) -> Data:
    row = row_of(anchor)
    data: Data = {"order_id": row.get("order_id"), "payment_id": row.get("id")}
    data.update(row)
    data.pop("id", None)
    return data


def payment_changed(anchor: RowChange, joined: list[RowChange]) -> Data:
    changed, previous = changed_fields(anchor, ("id",))
    row = row_of(anchor)
    return {
        "order_id": row.get("order_id"),
        "payment_id": row.get("id"),
        "changed": changed,
        "previous": previous,
    }


def payment_deleted(anchor: RowChange, joined: list[RowChange]) -> Data:
    row = row_of(anchor)
    return {"order_id": row.get("order_id"), "payment_id": row.get("id")}


def value_change(column: str) -> Builder:
    """ProductPriceChanged / ProductStockChanged: old and new value, plus the whole diff."""

    def build(anchor: RowChange, joined: list[RowChange]) -> Data:
        changed, previous = changed_fields(anchor, ("id",))
        after = anchor.after or {}
        before = anchor.before or {}
        return {
            "product_id": row_of(anchor).get("id"),
            f"old_{column}": before.get(column),
            f"new_{column}": after.get(column),
            "changed": changed,
            "previous": previous,
        }

    return build


# --- generic events (tables and ops without a rule) -------------------------------


def _key_of(change: RowChange) -> Data:
    row = row_of(change)
    return {name: row.get(name) for name in change.key}


def _table_name(change: RowChange) -> str:
    return change.table if change.schema == "public" else f"{change.schema}.{change.table}"


def row_inserted(anchor: RowChange, joined: list[RowChange]) -> Data:
    return {"table": _table_name(anchor), "key": _key_of(anchor), "row": row_of(anchor)}


def row_updated(anchor: RowChange, joined: list[RowChange]) -> Data:
    changed, previous = changed_fields(anchor, anchor.key)
    return {
        "table": _table_name(anchor),
        "key": _key_of(anchor),
        "changed": changed,
        "previous": previous,
    }


def row_deleted(anchor: RowChange, joined: list[RowChange]) -> Data:
    return {"table": _table_name(anchor), "key": _key_of(anchor)}


def table_truncated(anchor: RowChange, joined: list[RowChange]) -> Data:
    return {"schema": anchor.schema, "table": anchor.table}


# --- the catalogue ------------------------------------------------------------------

EVENT_TYPES: dict[str, EventType] = {
    t.name: t
    for t in (
        # order
        EventType("OrderPlaced", 1, order_placed),
        EventType("OrderItemsAdded", 1, order_items_added),
        EventType("OrderPaid", 2, order_status("paid_at", payment=True, totals=True, nested_payment=True), takes=1),
        EventType("OrderShipped", 1, order_status("shipped_at")),
        EventType("OrderCancelled", 1, order_status("cancelled_at", payment=True), takes=1),
        EventType("OrderRefunded", 1, order_status("refunded_at", payment=True), takes=1),
        EventType("OrderStatusChanged", 1, order_status(None)),
        EventType("OrderUpdated", 1, entity_diff("order_id")),
        EventType("OrderDeleted", 1, order_deleted),
        EventType("OrderSnapshotted", 1, entity("order_id")),
        EventType("OrderItemChanged", 1, order_item_changed),
        EventType("OrderItemRemoved", 1, order_item_removed),
        EventType("OrderItemSnapshotted", 1, order_item_snapshot),
        EventType("PaymentRecorded", 1, payment),
        EventType("PaymentChanged", 1, payment_changed),
        EventType("PaymentDeleted", 1, payment_deleted),
        EventType("PaymentSnapshotted", 1, payment),
        # customer
        EventType("CustomerRegistered", 1, entity("customer_id")),
        EventType("CustomerProfileChanged", 1, entity_diff("customer_id")),
        EventType("CustomerDeleted", 1, only_id("customer_id")),
        EventType("CustomerSnapshotted", 1, entity("customer_id")),
        # product
        EventType("ProductAdded", 1, entity("product_id")),
        EventType("ProductPriceChanged", 1, value_change("price")),
        EventType("ProductStockChanged", 1, value_change("stock")),
        EventType("ProductUpdated", 1, entity_diff("product_id")),
        EventType("ProductDeleted", 1, only_id("product_id")),
        EventType("ProductSnapshotted", 1, entity("product_id")),
        # any table
        EventType("RowInserted", 1, row_inserted),
        EventType("RowUpdated", 1, row_updated),
        EventType("RowDeleted", 1, row_deleted),
        EventType("RowSnapshotted", 1, row_inserted),
        EventType("TableTruncated", 1, table_truncated),
    )
}

# The event of a change no rule claims, by op.
GENERIC_EVENTS: dict[str, str] = {
    "c": "RowInserted",
    "u": "RowUpdated",
    "d": "RowDeleted",
    "r": "RowSnapshotted",
    "t": "TableTruncated",
}

ITEM_JOINS = ("OrderPlaced", "OrderItemsAdded")

ORDER = Aggregate(
    "order",
    tables={"orders": "id", "order_items": "order_id", "payments": "order_id"},
    rules=(
        #    table          op   event                   condition / joins
        Rule("orders",      "c", "OrderPlaced"),
        Rule("order_items", "c", "OrderItemsAdded",      joins=ITEM_JOINS),
        Rule("orders",      "u", "OrderPaid",            when=status_to("paid")),
        Rule("orders",      "u", "OrderShipped",         when=status_to("shipped")),
        Rule("orders",      "u", "OrderCancelled",       when=status_to("cancelled")),
        Rule("orders",      "u", "OrderRefunded",        when=status_to("refunded")),
        Rule("orders",      "u", "OrderStatusChanged",   when=status_changed),
        Rule("orders",      "u", "OrderUpdated"),
        Rule("payments",    "c", "PaymentRecorded",      when=column_is("kind", "capture"),
             joins=("OrderPaid",)),
        Rule("payments",    "c", "PaymentRecorded",      when=column_is("kind", "refund"),
             joins=("OrderRefunded", "OrderCancelled")),
        Rule("payments",    "c", "PaymentRecorded"),
        Rule("order_items", "u", "OrderItemChanged"),
        Rule("payments",    "u", "PaymentChanged"),
        Rule("orders",      "d", "OrderDeleted"),
        Rule("order_items", "d", "OrderItemRemoved",     joins=("OrderDeleted",)),
        Rule("payments",    "d", "PaymentDeleted",       joins=("OrderDeleted",)),
        Rule("orders",      "r", "OrderSnapshotted"),
        Rule("order_items", "r", "OrderItemSnapshotted"),
        Rule("payments",    "r", "PaymentSnapshotted"),
    ),
)  # fmt: skip

CUSTOMER = Aggregate(
    "customer",
    tables={"customers": "id"},
    rules=(
        Rule("customers",   "c", "CustomerRegistered"),
        Rule("customers",   "u", "CustomerProfileChanged"),
        Rule("customers",   "d", "CustomerDeleted"),
        Rule("customers",   "r", "CustomerSnapshotted"),
    ),
)  # fmt: skip

PRODUCT = Aggregate(
    "product",
    tables={"products": "id"},
    rules=(
        Rule("products",    "c", "ProductAdded"),
        Rule("products",    "u", "ProductPriceChanged",  when=value_changed("price")),
        Rule("products",    "u", "ProductStockChanged",  when=value_changed("stock")),
        Rule("products",    "u", "ProductUpdated"),
        Rule("products",    "d", "ProductDeleted"),
        Rule("products",    "r", "ProductSnapshotted"),
    ),
)  # fmt: skip

AGGREGATES: tuple[Aggregate, ...] = (ORDER, CUSTOMER, PRODUCT)
