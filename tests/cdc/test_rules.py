"""Each rule of cdc/rules.py: which row changes become which domain event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdc.changes import RowChange
from cdc.events import TABLE_WIDE_ID, DomainEvent
from cdc.mapping import TransactionMapper, map_transaction
from cdc.rules import AGGREGATES, EVENT_TYPES, GENERIC_EVENTS

COMMIT = 0x16_B374_D848
TS_MS = 1_764_139_447_123
T0 = "2026-11-26T06:00:00.000000Z"
T1 = "2026-11-26T07:00:00.000000Z"
KEYS = {"order_items": ("order_id", "line_no")}

Row = dict[str, Any] | None


def _changes(*rows: tuple[str, str, Row, Row], commit: int = COMMIT) -> list[RowChange]:
    out = []
    for seq, (op, table, before, after) in enumerate(rows):
        schema, _, name = table.rpartition(".")
        out.append(
            RowChange(
                op, schema or "public", name, KEYS.get(name, ("id",)), before, after, (), (),
                commit - 100 + seq, commit, 42, seq, TS_MS, None,
            )
        )
    return out


def events(*rows: tuple[str, str, Row, Row]) -> list[DomainEvent]:
    return list(map_transaction(_changes(*rows)))


def order(id: int = 1, **fields: Any) -> dict[str, Any]:
    row = {
        "id": id, "customer_id": 5, "status": "pending", "currency": "EUR",
        "subtotal": "20.00", "tax": "2.00", "shipping_fee": "0.00", "total": "22.00",
        "shipping_address": {"city": "Berlin"}, "placed_at": T0, "paid_at": None,
        "shipped_at": None, "cancelled_at": None, "refunded_at": None, "updated_at": T0,
    }  # fmt: skip
    row.update(fields)
    return row


def item(order_id: int = 1, line_no: int = 1) -> dict[str, Any]:
    return {"order_id": order_id, "line_no": line_no, "product_id": 3, "quantity": 2,
            "unit_price": "10.00", "line_total": "20.00"}  # fmt: skip


def payment(id: int = 9, order_id: int = 1, kind: str = "capture") -> dict[str, Any]:
    return {"id": id, "order_id": order_id, "kind": kind, "amount": "22.00", "method": "card",
            "provider_ref": "6c1f", "created_at": T1}  # fmt: skip


def paid(id: int = 1) -> dict[str, Any]:
    return order(id, status="paid", paid_at=T1, updated_at=T1)


def covered(event: DomainEvent) -> list[tuple[str, str]]:
    return [(c["source"]["table"], c["op"]) for c in event.changes]


def types(evs: list[DomainEvent]) -> list[str]:
    return [e.event_type for e in evs]


# ---- order


def test_order_insert_is_order_placed_carrying_its_items() -> None:
    (placed,) = events(
        ("c", "orders", None, order()),
        ("c", "order_items", None, item(line_no=1)),
        ("c", "order_items", None, item(line_no=2)),
    )
    assert placed.event_type == "OrderPlaced"
    assert (placed.aggregate_type, placed.aggregate_id) == ("order", "1")
    assert placed.data["customer_id"] == 5 and placed.data["total"] == "22.00"
    assert [i["line_no"] for i in placed.data["items"]] == [1, 2]
    assert covered(placed) == [("orders", "c"), ("order_items", "c"), ("order_items", "c")]


def test_order_placed_item_lines_carry_product_quantity_and_prices() -> None:
    (placed,) = events(("c", "orders", None, order()), ("c", "order_items", None, item()))
    assert placed.data["items"] == [
        {"line_no": 1, "product_id": 3, "quantity": 2, "unit_price": "10.00",
         "line_total": "20.00"}
    ]  # fmt: skip


def test_items_of_another_order_are_not_carried() -> None:
    evs = events(("c", "orders", None, order(1)), ("c", "order_items", None, item(order_id=2)))
    assert types(evs) == ["OrderPlaced", "OrderItemsAdded"]
    assert evs[0].data["items"] == []
    assert evs[1].aggregate_id == "2"


def test_order_placed_and_paid_in_one_transaction_are_two_events_in_order() -> None:
    evs = events(
        ("c", "orders", None, order()),
        ("c", "order_items", None, item()),
        ("u", "orders", None, paid()),
        ("c", "payments", None, payment()),
    )
    assert types(evs) == ["OrderPlaced", "OrderPaid"]
    assert [e.version & 0xFFFF for e in evs] == [1, 2]
    assert evs[0].version < evs[1].version


def test_status_to_paid_is_order_paid_covering_its_capture_payment() -> None:
    (ev,) = events(("u", "orders", None, paid()), ("c", "payments", None, payment()))
    assert ev.event_type == "OrderPaid"
    assert covered(ev) == [("orders", "u"), ("payments", "c")]
    assert ev.data["paid_at"] == T1
    assert ev.event_version == 2
    payment_fields = ev.data["payment"]
    assert (payment_fields["amount"], payment_fields["method"], payment_fields["payment_id"]) == ("22.00", "card", 9)


def test_capture_payment_written_before_the_status_update_is_still_covered() -> None:
    (ev,) = events(("c", "payments", None, payment()), ("u", "orders", None, paid()))
    assert ev.event_type == "OrderPaid"
    assert covered(ev) == [("payments", "c"), ("orders", "u")]
    assert ev.event_id.endswith(":0")  # named for the first change it covers


def test_status_from_before_image_gives_the_previous_status() -> None:
    (ev,) = events(("u", "orders", order(), paid()))
    assert ev.event_type == "OrderPaid"
    assert ev.data["previous_status"] == "pending"


def test_without_before_image_previous_status_is_unknown() -> None:
    (ev,) = events(("u", "orders", None, paid()))
    assert ev.data["previous_status"] is None


def test_order_paid_takes_only_one_payment() -> None:
    evs = events(
        ("u", "orders", None, paid()),
        ("c", "payments", None, payment(9)),
        ("c", "payments", None, payment(10)),
    )
    assert types(evs) == ["OrderPaid", "PaymentRecorded"]
    assert evs[1].data["payment_id"] == 10


def test_status_to_shipped_is_order_shipped() -> None:
    (ev,) = events(("u", "orders", None, order(status="shipped", paid_at=T0, shipped_at=T1,
                                              updated_at=T1)))  # fmt: skip
    assert ev.event_type == "OrderShipped"
    assert ev.data["shipped_at"] == T1


def test_status_to_cancelled_is_order_cancelled_covering_the_refund() -> None:
    (ev,) = events(
        ("u", "orders", None, order(status="cancelled", cancelled_at=T1, updated_at=T1)),
        ("c", "payments", None, payment(kind="refund")),
    )
    assert ev.event_type == "OrderCancelled"
    assert covered(ev) == [("orders", "u"), ("payments", "c")]
    assert ev.data["amount"] == "22.00"


def test_cancelling_an_unpaid_order_has_no_refund() -> None:
    (ev,) = events(("u", "orders", None, order(status="cancelled", cancelled_at=T1,
                                              updated_at=T1)))  # fmt: skip
    assert ev.event_type == "OrderCancelled"
    assert ev.data["payment_id"] is None and ev.data["amount"] is None


def test_status_to_refunded_is_order_refunded_covering_the_refund() -> None:
    (ev,) = events(
        ("u", "orders", None, order(status="refunded", paid_at=T0, refunded_at=T1, updated_at=T1)),
        ("c", "payments", None, payment(kind="refund")),
    )
    assert ev.event_type == "OrderRefunded"
    assert ev.data["refunded_at"] == T1
    assert len(ev.changes) == 2


def test_a_refund_payment_does_not_join_order_paid() -> None:
    evs = events(("u", "orders", None, paid()), ("c", "payments", None, payment(kind="refund")))
    assert types(evs) == ["OrderPaid", "PaymentRecorded"]


def test_multiple_status_changes_of_one_order_are_events_in_transaction_order() -> None:
    evs = events(
        ("u", "orders", None, paid()),
        ("c", "payments", None, payment()),
        ("u", "orders", None, order(status="shipped", paid_at=T1, shipped_at=T1, updated_at=T1)),
    )
    assert types(evs) == ["OrderPaid", "OrderShipped"]
    assert [e.version & 0xFFFF for e in evs] == [1, 2]


def test_update_of_a_paid_order_without_status_change_is_order_updated() -> None:
    later = "2026-11-26T08:00:00.000000Z"
    row = order(status="paid", paid_at=T1, updated_at=later, shipping_address={"city": "Bonn"})
    (ev,) = events(("u", "orders", None, row))
    assert ev.event_type == "OrderUpdated"


def test_known_status_change_to_pending_is_order_status_changed() -> None:
    (ev,) = events(("u", "orders", paid(), order()))
    assert ev.event_type == "OrderStatusChanged"
    assert (ev.data["status"], ev.data["previous_status"]) == ("pending", "paid")


def test_order_updated_lists_only_changed_fields_when_before_is_known() -> None:
    before = order()
    after = order(shipping_address={"city": "Bonn"}, updated_at=T1)
    (ev,) = events(("u", "orders", before, after))
    assert ev.data["changed"] == {"shipping_address": {"city": "Bonn"}, "updated_at": T1}
    assert ev.data["previous"] == {"shipping_address": {"city": "Berlin"}, "updated_at": T0}


def test_order_item_updated_alone_is_order_item_changed() -> None:
    (ev,) = events(("u", "order_items", None, item() | {"quantity": 3}))
    assert ev.event_type == "OrderItemChanged"
    assert (ev.aggregate_type, ev.aggregate_id) == ("order", "1")
    assert ev.data["line_no"] == 1 and ev.data["changed"]["quantity"] == 3


def test_order_items_inserted_alone_are_one_order_items_added() -> None:
    (ev,) = events(("c", "order_items", None, item(line_no=3)),
                   ("c", "order_items", None, item(line_no=4)))  # fmt: skip
    assert ev.event_type == "OrderItemsAdded"
    assert [i["line_no"] for i in ev.data["items"]] == [3, 4]


def test_payment_without_status_change_is_payment_recorded() -> None:
    (ev,) = events(("c", "payments", None, payment()))
    assert ev.event_type == "PaymentRecorded"
    assert (ev.aggregate_type, ev.aggregate_id) == ("order", "1")
    assert ev.data["kind"] == "capture"


def test_order_delete_is_order_deleted_covering_cascaded_rows() -> None:
    (ev,) = events(
        ("d", "orders", {"id": 1}, None),
        ("d", "order_items", {"order_id": 1, "line_no": 1}, None),
        ("d", "order_items", {"order_id": 1, "line_no": 2}, None),
    )
    assert ev.event_type == "OrderDeleted"
    assert ev.data["removed_items"] == [1, 2]
    assert len(ev.changes) == 3


def test_item_delete_alone_is_order_item_removed() -> None:
    (ev,) = events(("d", "order_items", {"order_id": 1, "line_no": 2}, None))
    assert ev.event_type == "OrderItemRemoved"
    assert ev.data == {"order_id": 1, "line_no": 2}


def test_payment_delete_without_order_id_falls_back_to_a_generic_event() -> None:
    (ev,) = events(("d", "payments", {"id": 9}, None))
    assert (ev.event_type, ev.aggregate_type, ev.aggregate_id) == ("RowDeleted", "payments", "9")


# ---- customer


def customer(**fields: Any) -> dict[str, Any]:
    row = {"id": 7, "email": "a@example.com", "full_name": "Ada", "phone": None,
           "profile": {"tier": "gold"}, "bio": "long text", "created_at": T0,
           "updated_at": T0}  # fmt: skip
    row.update(fields)
    return row


def test_customer_insert_is_customer_registered_with_the_row() -> None:
    (ev,) = events(("c", "customers", None, customer()))
    assert (ev.event_type, ev.aggregate_type, ev.aggregate_id) == ("CustomerRegistered",
                                                                  "customer", "7")  # fmt: skip
    assert ev.data["customer_id"] == 7 and ev.data["email"] == "a@example.com"
    assert "id" not in ev.data


def test_profile_change_with_before_image_lists_only_changed_fields() -> None:
    (ev,) = events(("u", "customers", customer(), customer(full_name="Ada L.", updated_at=T1)))
    assert ev.event_type == "CustomerProfileChanged"
    assert ev.data["changed"] == {"full_name": "Ada L.", "updated_at": T1}
    assert ev.data["previous"] == {"full_name": "Ada", "updated_at": T0}


def test_profile_change_without_before_image_lists_all_present_fields_but_the_key() -> None:
    after = customer(full_name="Ada L.")
    del after["bio"]  # unchanged TOAST value: absent, not changed
    (change,) = _changes(("u", "customers", None, after))
    change.unavailable = ("bio",)
    (ev,) = map_transaction([change])
    assert set(ev.data["changed"]) == {"email", "full_name", "phone", "profile", "created_at",
                                       "updated_at"}  # fmt: skip
    assert ev.data["previous"] == {}


def test_profile_change_with_key_only_before_compares_nothing_else() -> None:
    (ev,) = events(("u", "customers", {"id": 7}, customer(full_name="Ada L.")))
    assert "id" not in ev.data["changed"]
    assert ev.data["changed"]["full_name"] == "Ada L."


def test_unchanged_toast_column_is_not_a_changed_field() -> None:
    before = customer()
    after = customer(phone="+49")
    del after["bio"]
    (ev,) = events(("u", "customers", before, after))
    assert ev.data["changed"] == {"phone": "+49"}


def test_customer_delete_is_customer_deleted() -> None:
    (ev,) = events(("d", "customers", {"id": 7}, None))
    assert (ev.event_type, ev.data) == ("CustomerDeleted", {"customer_id": 7})


# ---- product


def product(**fields: Any) -> dict[str, Any]:
    row = {"id": 3, "sku": "S-3", "name": "Mug", "category": "kitchen", "price": "10.00",
           "stock": 5, "attributes": {}, "description": "long", "active": True,
           "created_at": T0, "updated_at": T0}  # fmt: skip
    row.update(fields)
    return row


def test_product_insert_is_product_added() -> None:
    (ev,) = events(("c", "products", None, product()))
    assert ev.event_type == "ProductAdded" and ev.data["product_id"] == 3


def test_price_change_is_product_price_changed_with_old_and_new_price() -> None:
    (ev,) = events(("u", "products", product(), product(price="12.50", updated_at=T1)))
    assert ev.event_type == "ProductPriceChanged"
    assert (ev.data["old_price"], ev.data["new_price"]) == ("10.00", "12.50")


def test_stock_change_is_product_stock_changed() -> None:
    (ev,) = events(("u", "products", product(), product(stock=3)))
    assert ev.event_type == "ProductStockChanged"
    assert (ev.data["old_stock"], ev.data["new_stock"]) == (5, 3)


def test_price_and_stock_change_together_is_a_price_change_listing_both() -> None:
    (ev,) = events(("u", "products", product(), product(price="9.00", stock=3)))
    assert ev.event_type == "ProductPriceChanged"
    assert set(ev.data["changed"]) == {"price", "stock"}


def test_other_product_update_is_product_updated() -> None:
    (ev,) = events(("u", "products", product(), product(name="Big mug")))
    assert ev.event_type == "ProductUpdated"
    assert ev.data["changed"] == {"name": "Big mug"}


def test_product_update_without_before_image_is_product_updated() -> None:
    (ev,) = events(("u", "products", None, product(price="12.50")))
    assert ev.event_type == "ProductUpdated"


def test_product_delete_is_product_deleted() -> None:
    (ev,) = events(("d", "products", {"id": 3}, None))
    assert ev.event_type == "ProductDeleted"


# ---- truncate


def test_truncate_is_a_table_wide_table_truncated_event() -> None:
    (ev,) = events(("t", "orders", None, None))
    assert (ev.event_type, ev.aggregate_type, ev.aggregate_id) == ("TableTruncated", "order",
                                                                  TABLE_WIDE_ID)  # fmt: skip
    assert ev.table_wide
    assert ev.data == {"schema": "public", "table": "orders"}


def test_truncate_comes_after_the_events_of_earlier_changes() -> None:
    evs = events(
        ("c", "customers", None, customer()),
        ("t", "customers", None, None),
        ("c", "customers", None, customer(id=8)),
    )
    assert types(evs) == ["CustomerRegistered", "TableTruncated", "CustomerRegistered"]


def test_truncate_of_two_tables_of_one_aggregate_gets_increasing_versions() -> None:
    evs = events(("t", "orders", None, None), ("t", "order_items", None, None))
    assert [e.version & 0xFFFF for e in evs] == [1, 2]


# ---- snapshot reads


def _read(table: str, row: dict[str, Any], lsn: int = COMMIT) -> RowChange:
    return RowChange("r", "public", table, KEYS.get(table, ("id",)), None, row, (), (),
                     lsn, lsn, 0, 0, TS_MS, "initial")  # fmt: skip


def test_snapshot_reads_are_snapshotted_events_with_the_full_row() -> None:
    mapper = TransactionMapper()
    assert mapper.snapshot(_read("orders", order())).event_type == "OrderSnapshotted"
    assert mapper.snapshot(_read("order_items", item())).event_type == "OrderItemSnapshotted"
    assert mapper.snapshot(_read("payments", payment())).event_type == "PaymentSnapshotted"
    ev = mapper.snapshot(_read("customers", customer()))
    assert ev.event_type == "CustomerSnapshotted" and ev.data["bio"] == "long text"
    assert mapper.snapshot(_read("products", product())).event_type == "ProductSnapshotted"


def test_snapshot_read_version_is_the_snapshot_lsn_with_k_zero() -> None:
    ev = TransactionMapper().snapshot(_read("products", product()))
    assert ev.version == COMMIT << 16
    assert ev.event_id == "16/B374D848:r:public.products:[3]"


def test_snapshot_read_of_an_item_belongs_to_its_order() -> None:
    ev = TransactionMapper().snapshot(_read("order_items", item(order_id=4)))
    assert (ev.aggregate_type, ev.aggregate_id) == ("order", "4")


# ---- tables without rules


def test_new_table_insert_is_row_inserted_under_the_table_name() -> None:
    (ev,) = events(("c", "coupons", None, {"id": 1, "code": "X"}))
    assert (ev.event_type, ev.aggregate_type, ev.aggregate_id) == ("RowInserted", "coupons", "1")
    assert ev.data == {"table": "coupons", "key": {"id": 1}, "row": {"id": 1, "code": "X"}}


def test_new_table_outside_public_is_schema_qualified() -> None:
    (ev,) = events(("u", "billing.invoices", None, {"id": 1, "total": "3.00"}))
    assert (ev.event_type, ev.aggregate_type) == ("RowUpdated", "billing.invoices")


def test_new_table_delete_and_snapshot_events() -> None:
    (deleted,) = events(("d", "coupons", {"id": 1}, None))
    assert deleted.event_type == "RowDeleted"
    read = RowChange("r", "public", "coupons", ("id",), None, {"id": 1}, (), (), COMMIT,
                     COMMIT, 0, 0, TS_MS, "initial")  # fmt: skip
    assert TransactionMapper().snapshot(read).event_type == "RowSnapshotted"


def test_composite_key_values_are_joined_into_the_aggregate_id() -> None:
    change = RowChange("c", "public", "stock_levels", ("warehouse", "sku"), None,
                       {"warehouse": "B", "sku": "S-1", "qty": 4}, (), (), COMMIT - 1, COMMIT,
                       1, 0, TS_MS, None)  # fmt: skip
    (ev,) = map_transaction([change])
    assert ev.aggregate_id == "B,S-1"


def test_keyless_rows_are_each_their_own_aggregate() -> None:
    rows = [RowChange("c", "public", "audit", (), None, {"msg": "x"}, (), (), COMMIT - 2 + i,
                      COMMIT, 1, i, TS_MS, None) for i in range(2)]  # fmt: skip
    evs = list(map_transaction(rows))
    assert [e.aggregate_id for e in evs] == ["16/B374D848:0", "16/B374D848:1"]


# ---- the catalogue


def test_every_rule_names_a_known_event_type() -> None:
    for agg in AGGREGATES:
        for rule in agg.rules:
            assert rule.event in EVENT_TYPES
            assert all(j in EVENT_TYPES for j in rule.joins)
    assert all(name in EVENT_TYPES for name in GENERIC_EVENTS.values())


def test_every_event_type_has_a_version_and_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "events.md").read_text()
    for name, spec in EVENT_TYPES.items():
        assert spec.version >= 1
        assert f"`{name}`" in doc, f"{name} is missing from docs/events.md"
