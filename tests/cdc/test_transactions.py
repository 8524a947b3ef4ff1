"""Transaction assembly: ordinary transactions pass through, streamed ones wait on disk.

Real-server recordings of the same situations are in test_pgoutput_recorded.py;
here each rule is pinned down with hand-built messages.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.changes import ChangeBuilder, RowChange, UnknownRelationError
from cdc.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputDecoder,
    PgOutputError,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Update,
    encode_message,
    pg_us_to_unix_ms,
)
from cdc.transactions import (
    AssembledItem,
    LogicalMessage,
    TransactionAssembler,
    TransactionEnd,
    TransactionStart,
)

REL = 16384
TS = 848_990_977_000_000  # us since 2000-01-01


def relation(xid: int | None = None, *extra: str) -> Relation:
    cols = (
        Column(1, "id", 23, -1),
        Column(0, "name", 25, -1),
        *(Column(0, c, 25, -1) for c in extra),
    )
    return Relation(xid, REL, "public", "t", "d", cols)


def ins(i: int, xid: int | None = None, *extra: bytes) -> Insert:
    return Insert(xid, REL, (str(i).encode(), f"n{i}".encode(), *extra))


class Feeder:
    """Feeds messages with increasing LSNs; records what each feed returned."""

    def __init__(self, spool: Path) -> None:
        self.asm = TransactionAssembler(spool)
        self.lsn = 0x100
        self.per_feed: list[tuple[PgOutputMessage, list[AssembledItem]]] = []

    def __call__(self, *msgs: PgOutputMessage) -> list[AssembledItem]:
        out: list[AssembledItem] = []
        for m in msgs:
            self.lsn += 0x10
            items = list(self.asm.feed(self.lsn, encode_message(m)))
            self.per_feed.append((m, items))
            out.extend(items)
        return out

    def stream(self, xid: int, *msgs: PgOutputMessage, first: bool = False) -> list[AssembledItem]:
        return self(StreamStart(xid, first), *msgs, StreamStop())


def rows(items: list[AssembledItem]) -> list[RowChange]:
    return [i for i in items if isinstance(i, RowChange)]


def ids(items: list[AssembledItem]) -> list[int]:
    return [c.after["id"] for c in rows(items) if c.after]


@pytest.fixture
def feed(tmp_path: Path) -> Feeder:
    f = Feeder(tmp_path / "spool")
    f(relation())
    return f


# ------------------------------------------------------------------ ordinary transactions


def test_ordinary_transaction_passes_straight_through(feed: Feeder) -> None:
    (start,) = feed(Begin(0x900, TS, 42))
    assert start == TransactionStart(42, 0x900, pg_us_to_unix_ms(TS), False)
    assert feed.asm.in_transaction
    (c0,) = feed(ins(1))
    (c1,) = feed(Update(None, REL, None, None, (b"1", b"renamed")))
    (c2,) = feed(Delete(None, REL, "K", (b"1", None)))
    (end,) = feed(Commit(0, 0x900, 0x930, TS))
    assert [(c.op, c.seq, c.txid, c.commit_lsn) for c in (c0, c1, c2)] == [
        ("c", 0, 42, 0x900), ("u", 1, 42, 0x900), ("d", 2, 42, 0x900),
    ]  # fmt: skip
    assert c0.lsn < c1.lsn < c2.lsn and c0.commit_ts_ms == start.commit_ts_ms
    assert (c2.before, c2.after, c2.key) == ({"id": 1}, None, ("id",))
    assert end == TransactionEnd(42, 0x900, 0x930, start.commit_ts_ms, 3)
    assert feed.asm.last_end_lsn == 0x930 and not feed.asm.in_transaction


def test_logical_messages_inside_and_outside_transactions(feed: Feeder) -> None:
    (outside,) = feed(Message(None, False, 0x500, "wm", b"low"))
    assert outside == LogicalMessage("wm", b"low", 0x500, False, 0, 0, 0)
    feed(Begin(0x900, TS, 7))
    (inside,) = feed(Message(None, True, 0x880, "app", b"{}"))
    assert (inside.txid, inside.commit_lsn, inside.transactional) == (7, 0x900, True)  # type: ignore[union-attr]


def test_truncate_yields_one_change_per_relation_numbered_in_the_transaction(feed: Feeder) -> None:
    feed(Relation(None, REL + 1, "public", "u", "d", (Column(1, "id", 23, -1),)))
    feed(Begin(0x900, TS, 7), ins(1))
    changes = feed(Truncate(None, 1, (REL, REL + 1)))
    assert [(c.op, c.table, c.seq, c.before, c.after) for c in rows(changes)] == [
        ("t", "t", 1, None, None), ("t", "u", 2, None, None),
    ]  # fmt: skip


def test_a_new_relation_message_replaces_the_old_description(feed: Feeder) -> None:
    feed(Begin(0x900, TS, 7))
    (before,) = feed(ins(1))
    feed(relation(None, "added"))
    (after,) = feed(ins(2, None, b"x"))
    assert before.after == {"id": 1, "name": "n1"}
    assert after.after == {"id": 2, "name": "n2", "added": "x"}


def test_unchanged_toast_is_absent_not_null(feed: Feeder) -> None:
    feed(relation(None, "bio"), Begin(0x900, TS, 7))
    (change,) = feed(Update(None, REL, None, None, (b"1", b"x", UNCHANGED_TOAST)))
    assert change.after == {"id": 1, "name": "x"} and change.unavailable == ("bio",)


def test_changes_before_any_relation_message_are_a_named_error(tmp_path: Path) -> None:
    f = Feeder(tmp_path)
    f(Begin(0x900, TS, 7))
    with pytest.raises(UnknownRelationError, match="relation id 16384"):
        f(ins(1))


def test_a_row_change_outside_a_transaction_is_a_named_error(feed: Feeder) -> None:
    with pytest.raises(PgOutputError, match="outside a transaction"):
        feed(ins(1))


# ------------------------------------------------------------------ streamed transactions


def test_streamed_transaction_emits_nothing_before_stream_commit(feed: Feeder) -> None:
    assert feed.stream(500, relation(500), ins(1, 500), ins(2, 500), first=True) == []
    assert feed.stream(500, ins(3, 500)) == []
    assert feed.asm.open_streams == (500,)
    items = feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))
    assert (
        isinstance(items[0], TransactionStart)
        and items[0].streamed
        and items[0].commit_lsn == 0xA00
    )
    assert ids(items) == [1, 2, 3]
    changes = rows(items)
    assert [c.seq for c in changes] == [0, 1, 2]
    assert all((c.txid, c.commit_lsn) == (500, 0xA00) for c in changes)
    assert changes[0].lsn < changes[1].lsn < changes[2].lsn  # each keeps its own WAL position
    assert items[-1] == TransactionEnd(500, 0xA00, 0xA30, pg_us_to_unix_ms(TS), 3)
    assert feed.asm.last_end_lsn == 0xA30 and feed.asm.open_streams == ()


def test_streamed_changes_wait_on_disk_not_in_memory(feed: Feeder) -> None:
    big = b"x" * 10_000
    feed.stream(500, relation(500, "pad"), *(ins(i, 500, big) for i in range(100)), first=True)
    (spool,) = feed.asm.spool_dir.iterdir()
    assert spool.stat().st_size > 100 * 10_000
    feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))
    assert list(feed.asm.spool_dir.iterdir()) == []


def test_interleaved_streamed_transactions_come_out_whole_in_commit_order(feed: Feeder) -> None:
    feed.stream(500, relation(500), ins(1, 500), first=True)
    feed.stream(600, relation(600), ins(10, 600), first=True)
    feed.stream(500, ins(2, 500))
    feed(Begin(0x900, TS, 550), ins(100), Commit(0, 0x900, 0x930, TS))
    feed.stream(600, ins(11, 600))
    second = feed(StreamCommit(600, 0, 0xA00, 0xA30, TS))
    first = feed(StreamCommit(500, 0, 0xB00, 0xB30, TS))
    assert ids(second) == [10, 11] and ids(first) == [1, 2]
    ends = [
        items[-1] for m, items in feed.per_feed if items and isinstance(items[-1], TransactionEnd)
    ]
    assert [e.xid for e in ends] == [550, 600, 500]


def test_stream_abort_of_the_whole_transaction_discards_it(feed: Feeder) -> None:
    feed.stream(500, relation(500), ins(1, 500), first=True)
    assert feed(StreamAbort(500, 500)) == []
    assert feed.asm.open_streams == () and list(feed.asm.spool_dir.iterdir()) == []


def test_stream_abort_of_a_subtransaction_drops_it_and_what_followed(feed: Feeder) -> None:
    # top 500 inserts 1; subxact 501 inserts 2; subxact 502 (inside 501) inserts 3;
    # ROLLBACK TO the savepoint of 501 aborts 501 and 502; then top inserts 4
    feed.stream(500, relation(500), ins(1, 500), ins(2, 501), ins(3, 502), first=True)
    feed(StreamAbort(500, 502), StreamAbort(500, 501))
    feed.stream(500, ins(4, 500))
    items = feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))
    assert ids(items) == [1, 4]
    assert [c.seq for c in rows(items)] == [0, 1]


def test_stream_abort_of_a_later_subtransaction_keeps_the_earlier_one(feed: Feeder) -> None:
    feed.stream(500, relation(500), ins(1, 501), ins(2, 503), ins(3, 500), first=True)
    feed(StreamAbort(500, 503))
    feed.stream(500, ins(5, 504))
    assert ids(feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))) == [1, 5]


def test_schema_sent_inside_a_rolled_back_subtransaction_still_describes_later_rows(
    tmp_path: Path,
) -> None:
    f = Feeder(tmp_path)  # no Relation known before the stream
    f.stream(500, relation(501), ins(1, 501), first=True)
    f(StreamAbort(500, 501))
    f.stream(500, ins(2, 500))  # pgoutput will not resend the Relation in this transaction
    assert ids(f(StreamCommit(500, 0, 0xA00, 0xA30, TS))) == [2]


def test_relation_from_an_aborted_stream_is_not_applied(feed: Feeder) -> None:
    feed.stream(500, relation(500, "extra"), ins(1, 500, b"x"), first=True)
    feed(StreamAbort(500, 500))
    feed(Begin(0x900, TS, 7))
    (change,) = feed(ins(2))
    assert change.after == {"id": 2, "name": "n2"}


def test_logical_message_and_truncate_inside_a_stream(feed: Feeder) -> None:
    feed.stream(
        500,
        relation(500),
        ins(1, 500),
        Message(500, True, 0x990, "p", b"m"),
        Truncate(500, 0, (REL,)),
        first=True,
    )
    items = feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))
    body = items[1:-1]
    assert isinstance(body[1], LogicalMessage) and body[1].txid == 500
    assert [(c.op, c.seq) for c in rows(body)] == [("c", 0), ("t", 1)]


def test_origin_after_stream_start_is_accepted(feed: Feeder) -> None:
    # pgoutput sends Origin right after the first Stream Start of a transaction
    # that itself came from a replication origin
    feed(StreamStart(500, True), Origin(0, "upstream"), relation(500), ins(1, 500), StreamStop())
    assert ids(feed(StreamCommit(500, 0, 0xA00, 0xA30, TS))) == [1]


def test_messages_inside_a_stream_block_must_carry_an_xid(feed: Feeder) -> None:
    feed(StreamStart(500, True))
    with pytest.raises(PgOutputError, match="inside the stream block of xid 500"):
        feed.asm.feed(0x999, encode_message(Begin(1, 2, 3)))


def test_spool_files_are_removed_on_close_and_stale_ones_on_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    f = Feeder(spool)
    f.stream(500, relation(500), ins(1, 500), first=True)
    assert len(list(spool.iterdir())) == 1
    TransactionAssembler(spool)  # a restart: the server will resend transaction 500 from its start
    assert list(spool.iterdir()) == []
    f2 = Feeder(spool)
    f2.stream(600, relation(600), ins(1, 600), first=True)
    f2.asm.close()
    assert list(spool.iterdir()) == []


# ------------------------------------------------------------------ RowChange


def _recorded(name: str) -> list[tuple[int, bytes]]:
    data = json.loads((Path(__file__).parent / "fixtures" / f"pgoutput_{name}.json").read_text())
    return [(i, base64.b64decode(b64)) for i, (_, b64) in enumerate(data["messages"])]


def test_single_pass_and_message_decoding_agree_on_recorded_changes() -> None:
    fast, slow = ChangeBuilder(), ChangeBuilder()
    decoder = PgOutputDecoder()
    checked = 0
    for name in ("dml", "types"):
        for lsn, raw in _recorded(name):
            msg = decoder.decode(raw)
            if isinstance(msg, Relation):
                fast.add_relation(msg)
                slow.add_relation(msg)
            elif isinstance(msg, (Insert, Update, Delete)):
                method: Any = {Insert: slow.insert, Update: slow.update, Delete: slow.delete}[
                    type(msg)
                ]
                assert fast.change(raw, lsn, 1, 2, 3, 4) == method(msg, lsn, 1, 2, 3, 4)
                checked += 1
    assert checked > 10


def test_envelope_is_debezium_shaped() -> None:
    change = RowChange(
        "u", "public", "orders", ("id",), {"id": 1}, {"id": 1, "status": "paid"}, ("bio",), (),
        0x16_B374D848, 0x16_B374D900, 42, 3, 1_764_139_198_000, None,
    )  # fmt: skip
    assert change.envelope() == {
        "op": "u",
        "before": {"id": 1},
        "after": {"id": 1, "status": "paid"},
        "unavailable": ["bio"],
        "source": {
            "lsn": "16/B374D848", "commit_lsn": "16/B374D900", "txid": 42, "seq": 3,
            "schema": "public", "table": "orders", "snapshot": None, "ts_ms": 1_764_139_198_000,
        },
    }  # fmt: skip
    change.unconverted = ("weird",)
    assert change.envelope()["unconverted"] == ["weird"]
    orjson.dumps(change.envelope())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_corrupted_stream_raises_only_pgoutput_error(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    messages = _recorded("dml")
    i = data.draw(st.integers(0, len(messages) - 1))
    raw = bytearray(messages[i][1])
    pos = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    else:
        del raw[pos:]
    messages[i] = (i, bytes(raw))
    asm = TransactionAssembler(tmp_path_factory.mktemp("spool"))
    try:
        for lsn, m in messages:
            for item in asm.feed(lsn, m):
                if isinstance(item, RowChange):
                    orjson.dumps(item.envelope())
    except PgOutputError:
        pass
    finally:
        asm.close()
