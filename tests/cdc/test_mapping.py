"""The transaction mapper: grouping, losslessness, versions, ids and bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.changes import RowChange
from cdc.events import DomainEvent
from cdc.lsn import format_lsn
from cdc.mapping import MappingError, TransactionMapper, map_transaction

COMMIT = 0x16_B374_D848
TS_MS = 1_764_139_447_123
T0 = "2026-11-26T06:00:00.000000Z"
T1 = "2026-11-26T07:00:00.000000Z"
KEYS: dict[str, tuple[str, ...]] = {"order_items": ("order_id", "line_no"), "audit": ()}


def _change(op: str, table: str, seq: int, before: dict[str, Any] | None,
            after: dict[str, Any] | None, commit: int = COMMIT) -> RowChange:
    schema, _, name = table.rpartition(".")
    return RowChange(op, schema or "public", name, KEYS.get(name, ("id",)), before, after, (),
                     (), commit - 1000 + seq, commit, 42, seq, TS_MS, None)  # fmt: skip


def run(txs: list[list[RowChange]], mapper: TransactionMapper) -> list[DomainEvent]:
    out: list[DomainEvent] = []
    for tx in txs:
        mapper.begin(tx[0].commit_lsn, tx[0].commit_ts_ms, tx[0].txid)
        for change in tx:
            out.extend(mapper.add(change))
        out.extend(mapper.end())
    return out


# ---- random transactions across all kinds of tables

STATUSES = ["pending", "paid", "shipped", "cancelled", "refunded"]
stamps = st.sampled_from([None, T0, T1])


@st.composite
def row_changes(draw: st.DrawFn, seq: int, commit: int) -> RowChange:
    table = draw(st.sampled_from(["orders", "order_items", "payments", "customers", "products",
                                  "coupons", "audit", "billing.invoices"]))  # fmt: skip
    op = draw(st.sampled_from(["c", "c", "u", "u", "d", "t"] if seq % 7 else ["c", "u", "d"]))
    if op == "t":
        return _change("t", table, seq, None, None, commit)
    oid = draw(st.integers(1, 3))
    if table == "orders":
        status = draw(st.sampled_from(STATUSES))
        row: dict[str, Any] = {"id": oid, "status": status, "updated_at": draw(stamps)}
        row[f"{status}_at"] = draw(stamps)
    elif table == "order_items":
        row = {"order_id": oid, "line_no": draw(st.integers(1, 3)), "quantity": 1}
    elif table == "payments":
        row = {"id": draw(st.integers(1, 5)), "order_id": oid,
               "kind": draw(st.sampled_from(["capture", "refund"]))}  # fmt: skip
    else:
        row = {"id": oid, "price": draw(st.sampled_from(["1.00", "2.00"])),
               "stock": draw(st.integers(0, 2))}  # fmt: skip
    key = KEYS.get(table.rpartition(".")[2], ("id",))
    if op == "c":
        return _change("c", table, seq, None, row, commit)
    image = draw(st.sampled_from(["none", "key", "full"]))
    before = None
    if image == "key":
        before = {k: row[k] for k in key}
    elif image == "full":
        before = dict(row, **draw(st.fixed_dictionaries({}, optional={
            "status": st.sampled_from(STATUSES), "price": st.just("9.00"),
            "stock": st.integers(0, 2)})))  # fmt: skip
    if op == "d":
        return _change("d", table, seq, before if before is not None else {k: row[k] for k in key},
                       None, commit)  # fmt: skip
    return _change("u", table, seq, before, row, commit)


@st.composite
def transactions(draw: st.DrawFn) -> list[list[RowChange]]:
    txs = []
    commit = COMMIT
    for _ in range(draw(st.integers(1, 4))):
        commit += draw(st.integers(40, 4000))
        n = draw(st.integers(1, 25))
        txs.append([draw(row_changes(seq, commit)) for seq in range(n)])
    return txs


caps = st.tuples(st.integers(1, 4), st.integers(0, 8), st.integers(1, 3))


def _mapper(cap: tuple[int, int, int]) -> TransactionMapper:
    per_event, extra, tracked = cap
    return TransactionMapper(max_changes_per_event=per_event,
                             max_held_changes=per_event + extra,
                             max_tracked_aggregates=tracked)  # fmt: skip


def _ident(env: dict[str, Any]) -> tuple[str, int]:
    return env["source"]["commit_lsn"], env["source"]["seq"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), caps)
def test_every_change_is_in_exactly_one_event(txs: list[list[RowChange]], cap: Any) -> None:
    events = run(txs, _mapper(cap))
    covered = Counter(_ident(env) for e in events for env in e.changes)
    expected = Counter((format_lsn(c.commit_lsn), c.seq) for tx in txs for c in tx)
    assert covered == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), caps)
def test_versions_of_each_aggregate_strictly_increase(txs: list[list[RowChange]],
                                                      cap: Any) -> None:  # fmt: skip
    last: dict[tuple[str, str], int] = {}
    for e in run(txs, _mapper(cap)):
        agg = (e.aggregate_type, e.aggregate_id)
        assert e.version > last.get(agg, -1), f"{agg} went back at {e.event_id}"
        assert e.version >> 16 == e.commit_lsn and e.version & 0xFFFF >= 1
        last[agg] = e.version


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), caps)
def test_event_ids_are_unique_and_the_same_on_replay(txs: list[list[RowChange]],
                                                     cap: Any) -> None:  # fmt: skip
    first = run(txs, _mapper(cap))
    second = run(txs, _mapper(cap))
    assert first == second
    ids = [e.event_id for e in first]
    assert len(ids) == len(set(ids))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), caps)
def test_an_event_is_named_for_its_first_change_and_lists_changes_in_order(
    txs: list[list[RowChange]], cap: Any
) -> None:
    for e in run(txs, _mapper(cap)):
        seqs = [env["source"]["seq"] for env in e.changes]
        assert seqs == sorted(seqs)
        assert e.event_id == f"{format_lsn(e.commit_lsn)}:{seqs[0]}"
        assert len(e.changes) <= cap[0]


# ---- caps


def _big_order(items: int) -> list[RowChange]:
    tx = [_change("c", "orders", 0, None, {"id": 1, "status": "pending"})]
    tx += [_change("c", "order_items", i, None, {"order_id": 1, "line_no": i})
           for i in range(1, items + 1)]  # fmt: skip
    return tx


def test_an_order_with_more_items_than_an_event_holds_continues_in_items_added() -> None:
    events = list(map_transaction(_big_order(1200), TransactionMapper(max_changes_per_event=500)))
    assert [e.event_type for e in events] == ["OrderPlaced", "OrderItemsAdded", "OrderItemsAdded"]
    lines = [i["line_no"] for e in events for i in e.data["items"]]
    assert lines == list(range(1, 1201))
    assert [e.version & 0xFFFF for e in events] == [1, 2, 3]


def test_an_order_and_its_items_within_the_cap_are_one_event() -> None:
    events = list(map_transaction(_big_order(499), TransactionMapper(max_changes_per_event=500)))
    assert [e.event_type for e in events] == ["OrderPlaced"]


def test_an_order_larger_than_the_held_cap_is_emitted_in_full_events_as_it_arrives() -> None:
    mapper = TransactionMapper(max_changes_per_event=500, max_held_changes=1000)
    mapper.begin(COMMIT, TS_MS, 42)
    early: list[DomainEvent] = []
    for change in _big_order(2500):
        early += mapper.add(change)
    events = early + mapper.end()
    assert early, "nothing was emitted before end()"
    assert events[0].event_type == "OrderPlaced"
    assert {e.event_type for e in events[1:]} == {"OrderItemsAdded"}
    assert [i["line_no"] for e in events for i in e.data["items"]] == list(range(1, 2501))
    versions = [e.version for e in events]
    assert versions == sorted(set(versions))


def test_held_changes_beyond_the_cap_are_emitted_early_from_add() -> None:
    mapper = TransactionMapper(max_changes_per_event=2, max_held_changes=3)
    mapper.begin(COMMIT, TS_MS, 42)
    early: list[DomainEvent] = []
    for seq in range(5):
        early += mapper.add(_change("c", "customers", seq, None, {"id": seq}))
    assert [e.aggregate_id for e in early] == ["0", "1"]
    assert [e.aggregate_id for e in mapper.end()] == ["2", "3", "4"]


def test_an_aggregate_emitted_early_continues_with_higher_versions() -> None:
    mapper = TransactionMapper(max_changes_per_event=1, max_held_changes=1)
    tx = [_change("u", "customers", s, None, {"id": i, "n": s})
          for s, i in enumerate([1, 2, 1, 2, 1])]  # fmt: skip
    events = run([tx], mapper)
    ones = [e.version & 0xFFFF for e in events if e.aggregate_id == "1"]
    assert ones == [1, 2, 3]


def test_forgotten_aggregates_restart_above_every_forgotten_version() -> None:
    mapper = TransactionMapper(max_changes_per_event=1, max_held_changes=1,
                               max_tracked_aggregates=1)  # fmt: skip
    tx = [_change("u", "customers", s, None, {"id": i}) for s, i in enumerate([1, 1, 2, 3, 1])]
    events = run([tx], mapper)
    ones = [e.version & 0xFFFF for e in events if e.aggregate_id == "1"]
    assert ones[0] < ones[1] < ones[2]


_HUGE_TX = """
import json, resource, sys
from cdc.changes import RowChange
from cdc.mapping import TransactionMapper

n, commit = int(sys.argv[1]), 0x16_B374_D848
mapper = TransactionMapper(max_held_changes=20_000)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
covered = 0
mapper.begin(commit, 0, 1)
for seq in range(n):  # orders with three items each, and product updates
    if seq % 10 == 0:
        op, table, key, row = "c", "orders", ("id",), {"id": seq, "status": "pending"}
    elif seq % 10 < 4:
        op, table, key = "c", "order_items", ("order_id", "line_no")
        row = {"order_id": seq - seq % 10, "line_no": seq % 10}
    else:
        op, table, key, row = "u", "products", ("id",), {"id": seq, "stock": 1}
    change = RowChange(op, "public", table, key, None, row, (), (), commit - n + seq, commit,
                       1, seq, 0, None)
    for event in mapper.add(change):
        covered += len(event.changes)
for event in mapper.end():
    covered += len(event.changes)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"covered": covered, "growth_kib": growth}))
"""


def test_a_huge_transaction_is_mapped_in_bounded_memory() -> None:
    # A fresh process, so its peak RSS is this transaction's alone. Holding all
    # 500k changes (no cap) grows it by ~850 MiB; the 20k-change cap by ~45 MiB.
    done = subprocess.run(
        [sys.executable, "-c", _HUGE_TX, "500000"],
        capture_output=True, text=True, check=True, timeout=240,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    result = json.loads(done.stdout)
    assert result["covered"] == 500_000
    assert result["growth_kib"] < 150 * 1024, f"peak RSS grew by {result['growth_kib']} KiB"


# ---- contract of the calls


def test_a_change_outside_a_transaction_is_refused() -> None:
    with pytest.raises(MappingError, match="begin"):
        TransactionMapper().add(_change("c", "customers", 0, None, {"id": 1}))


def test_a_change_of_another_transaction_is_refused() -> None:
    mapper = TransactionMapper()
    mapper.begin(COMMIT, TS_MS, 42)
    with pytest.raises(MappingError, match="16/B374D849"):
        mapper.add(_change("c", "customers", 0, None, {"id": 1}, commit=COMMIT + 1))


def test_begin_while_a_transaction_is_open_is_refused() -> None:
    mapper = TransactionMapper()
    mapper.begin(COMMIT, TS_MS, 42)
    with pytest.raises(MappingError, match="end"):
        mapper.begin(COMMIT + 1, TS_MS, 43)


def test_an_unknown_op_is_refused_with_the_expected_ones() -> None:
    mapper = TransactionMapper()
    mapper.begin(COMMIT, TS_MS, 42)
    with pytest.raises(MappingError, match="'x'"):
        mapper.add(_change("x", "customers", 0, None, {"id": 1}))


def test_a_snapshot_read_given_to_add_becomes_its_snapshot_event() -> None:
    read = RowChange("r", "public", "customers", ("id",), None, {"id": 1}, (), (), COMMIT,
                     COMMIT, 0, 0, TS_MS, "incremental")  # fmt: skip
    (event,) = TransactionMapper().add(read)
    assert event.event_type == "CustomerSnapshotted" and event.version == COMMIT << 16


def test_occurred_at_is_the_commit_time() -> None:
    (event,) = map_transaction([_change("c", "customers", 0, None, {"id": 1})])
    assert event.occurred_at == "2025-11-26T06:44:07.123Z"


def test_caps_that_contradict_each_other_are_refused() -> None:
    with pytest.raises(MappingError, match="max_changes_per_event"):
        TransactionMapper(max_changes_per_event=10, max_held_changes=5)
