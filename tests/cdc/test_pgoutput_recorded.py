"""pgoutput decoding of bytes recorded from the real server.

Every scenario runs twice: from its recording in tests/cdc/fixtures (offline)
and live against the local Postgres (a fresh slot, the same SQL). To refresh
the recordings: RECORD_PGOUTPUT_FIXTURES=1 pytest tests/cdc/test_pgoutput_recorded.py -k live
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc.changes import RowChange
from cdc.lsn import format_lsn, parse_lsn
from cdc.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputDecoder,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    pg_us_to_unix_ms,
)
from cdc.transactions import (
    AssembledItem,
    LogicalMessage,
    TransactionAssembler,
    TransactionEnd,
    TransactionStart,
)

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = os.environ.get("RECORD_PGOUTPUT_FIXTURES") == "1"
# What the replication connection sets (cdc/values.py documents why).
DECODING_SESSION = {"TimeZone": "UTC", "DateStyle": "ISO", "IntervalStyle": "iso_8601"}
VALUE_CASES = json.loads((FIXTURES / "value_cases.json").read_text())


@dataclass
class Recording:
    scenario: str
    sql: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    # The same changes decoded in another session (other TimeZone / IntervalStyle / bytea_output).
    alt_session: dict[str, str] = field(default_factory=dict)
    alt_messages: list[tuple[int, bytes]] = field(default_factory=list)

    def save(self) -> None:
        data = {
            "scenario": self.scenario,
            "sql": self.sql,
            "notes": self.notes,
            "messages": [
                [format_lsn(lsn), base64.b64encode(m).decode()] for lsn, m in self.messages
            ],
            "alt_session": self.alt_session,
            "alt_messages": [
                [format_lsn(lsn), base64.b64encode(m).decode()] for lsn, m in self.alt_messages
            ],
        }
        text = json.dumps(data, indent=1) + "\n"
        path = FIXTURES / f"pgoutput_{self.scenario}.json"
        path.with_suffix(".json.gz").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        if len(text) > 200_000:  # big streamed transactions: compress (they are mostly padding)
            path.with_suffix(".json.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        else:
            path.write_text(text)

    @classmethod
    def load(cls, scenario: str) -> Recording:
        path = FIXTURES / f"pgoutput_{scenario}.json"
        if path.exists():
            data = json.loads(path.read_text())
        else:
            data = json.loads(gzip.decompress(path.with_suffix(".json.gz").read_bytes()))

        def msgs(rows: list[list[str]]) -> list[tuple[int, bytes]]:
            return [(parse_lsn(lsn), base64.b64decode(b64)) for lsn, b64 in rows]

        return cls(
            scenario,
            data["sql"],
            data["notes"],
            msgs(data["messages"]),
            data["alt_session"],
            msgs(data["alt_messages"]),
        )


OpenSlot = Callable[..., contextlib.AbstractContextManager[Any]]


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


class Session:
    """Runs SQL in one connection and writes it down for the recording."""

    def __init__(self, conn: psycopg.Connection, rec: Recording, name: str = "") -> None:
        self.conn, self.rec, self.name = conn, rec, name

    def __call__(self, statement: str) -> Any:
        self.rec.sql.append(f"{self.name}: {statement}" if self.name else statement)
        cur = self.conn.execute(statement)
        return cur.fetchone() if cur.description else None


def _in_schema(dsn: str, schema: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
    return conn


# ------------------------------------------------------------------ scenarios


def record_dml(dsn: str, open_logical_slot: OpenSlot) -> Recording:
    rec = Recording("dml")
    schema = unique_name("dec")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            with _in_schema(dsn, schema) as conn:
                q = Session(conn, rec)
                q("CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text)")
                q("ALTER TABLE items ALTER COLUMN note SET STORAGE EXTERNAL")
                q("CREATE TABLE fullrow (id int, v text)")
                q("ALTER TABLE fullrow REPLICA IDENTITY FULL")
                q("CREATE TABLE parent (id serial PRIMARY KEY)")
                q("CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)")
                tables = [f"{schema}.{t}" for t in ("items", "fullrow", "parent", "child")]
                with open_logical_slot(tables) as slot:
                    q("INSERT INTO items VALUES (1, 'a', 1, repeat('x', 10000))")
                    q("INSERT INTO items VALUES (2, 'b', NULL, NULL)")
                    q("UPDATE items SET qty = 5 WHERE id = 1")
                    q("UPDATE items SET id = 3 WHERE id = 2")
                    q("DELETE FROM items WHERE id = 3")
                    q("INSERT INTO fullrow VALUES (1, 'x')")
                    q("UPDATE fullrow SET v = 'y'")
                    q("DELETE FROM fullrow")
                    q("BEGIN")
                    q("SELECT pg_logical_emit_message(true, 'dec', 'in-tx')")
                    q("INSERT INTO items VALUES (4, 'd', 4, 'short')")
                    q("COMMIT")
                    q("SELECT pg_logical_emit_message(false, 'dec', 'outside')")
                    q("ALTER TABLE items ADD COLUMN extra numeric")
                    q("INSERT INTO items VALUES (5, 'e', 5, NULL, 1.5)")
                    q("ALTER TABLE items DROP COLUMN qty")
                    q("INSERT INTO items VALUES (6, 'f', NULL, 2.5)")
                    q("ALTER TABLE items ALTER COLUMN extra TYPE text")
                    q("UPDATE items SET extra = 'now text' WHERE id = 6")
                    q("INSERT INTO parent DEFAULT VALUES")
                    q("INSERT INTO child VALUES (1, 1)")
                    q("TRUNCATE parent RESTART IDENTITY CASCADE")
                    origin = unique_name("dec_origin")
                    rec.notes["origin"] = origin
                    q(f"SELECT pg_replication_origin_create('{origin}')")
                    try:
                        q(f"SELECT pg_replication_origin_session_setup('{origin}')")
                        q("BEGIN")
                        q("SELECT pg_replication_origin_xact_setup('1/2', now())")
                        q("INSERT INTO items VALUES (7, 'from origin', NULL, NULL)")
                        q("COMMIT")
                        q("SELECT pg_replication_origin_session_reset()")
                    finally:
                        q(f"SELECT pg_replication_origin_drop('{origin}')")
                    rec.messages = slot.peek(**DECODING_SESSION)
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return rec


def record_types(dsn: str, open_logical_slot: OpenSlot) -> Recording:
    rec = Recording("types")
    schema = unique_name("dec")
    cases = VALUE_CASES["cases"]
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            with _in_schema(dsn, schema) as conn:
                q = Session(conn, rec)
                for statement in VALUE_CASES["setup"]:
                    q(statement)
                cols = ", ".join(f"c{i} {c['type']}" for i, c in enumerate(cases))
                q(f"CREATE TABLE vals (id int PRIMARY KEY, {cols})")
                with open_logical_slot([f"{schema}.vals"]) as slot:
                    values = ", ".join(f"{c['sql']}" for c in cases)
                    q(f"INSERT INTO vals VALUES (1, {values})")
                    q("INSERT INTO vals (id) VALUES (2)")
                    rec.messages = slot.peek(**DECODING_SESSION)
                    rec.alt_session = {
                        "TimeZone": "Asia/Kathmandu",
                        "DateStyle": "ISO, DMY",
                        "IntervalStyle": "postgres",
                        "bytea_output": "escape",
                    }
                    rec.alt_messages = slot.peek(**rec.alt_session)
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return rec


STREAM_ROWS = 400  # x ~150 bytes: well over logical_decoding_work_mem = 64kB


def record_stream(dsn: str, open_logical_slot: OpenSlot) -> Recording:
    rec = Recording("stream")
    schema = unique_name("dec")
    rows = STREAM_ROWS

    def fill(first: int) -> str:
        return f"INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series({first}, {first + rows - 1}) g"

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            with _in_schema(dsn, schema) as a_conn, _in_schema(dsn, schema) as b_conn:
                a = Session(a_conn, rec, "A")
                b = Session(b_conn, rec, "B")
                a("CREATE TABLE big (id int PRIMARY KEY, pad text)")
                a("CREATE TABLE small (id int PRIMARY KEY)")
                with open_logical_slot([f"{schema}.big", f"{schema}.small"]) as slot:
                    # 1. a big transaction: streamed, then committed
                    a("BEGIN")
                    rec.notes["big"] = a("SELECT txid_current()")[0]
                    a(fill(1))
                    a("SELECT pg_logical_emit_message(true, 'dec', 'inside big')")
                    a("COMMIT")
                    # 2. a rolled-back subtransaction inside a streamed transaction
                    a("BEGIN")
                    rec.notes["savepoint"] = a("SELECT txid_current()")[0]
                    a(fill(10001))
                    a("SAVEPOINT s1")
                    a(fill(20001))
                    a("ROLLBACK TO SAVEPOINT s1")
                    a(fill(30001))
                    a("COMMIT")
                    # 3. a streamed transaction that aborts
                    a("BEGIN")
                    rec.notes["aborted"] = a("SELECT txid_current()")[0]
                    a(fill(40001))
                    a(fill(41001))
                    a("ROLLBACK")
                    # 4. two streamed transactions interleaved, plus a small one in between;
                    #    B commits first
                    a("BEGIN")
                    rec.notes["first_open"] = a("SELECT txid_current()")[0]
                    a(fill(50001))
                    b("BEGIN")
                    rec.notes["first_committed"] = b("SELECT txid_current()")[0]
                    b(fill(60001))
                    a(fill(51001))
                    b(fill(61001))
                    small = Session(admin, rec, "C")
                    small(
                        sql.SQL("INSERT INTO {}.small VALUES (1)")
                        .format(sql.Identifier(schema))
                        .as_string(admin)
                    )
                    b("COMMIT")
                    a("COMMIT")
                    rec.messages = slot.peek(logical_decoding_work_mem="64kB", **DECODING_SESSION)
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return rec


SCENARIOS: dict[str, Callable[[str, OpenSlot], Recording]] = {
    "dml": record_dml,
    "types": record_types,
    "stream": record_stream,
}
_live: dict[str, Recording] = {}


@pytest.fixture(params=["recorded", "live"])
def recording(request: pytest.FixtureRequest) -> Callable[[str], Recording]:
    """``recording(scenario)``: the recorded bytes, or a fresh live run (once per session)."""
    if request.param == "recorded":
        return Recording.load

    dsn = request.getfixturevalue("cdc_test_dsn")
    open_slot = request.getfixturevalue("open_slot")

    def live(scenario: str) -> Recording:
        if scenario not in _live:
            _live[scenario] = SCENARIOS[scenario](dsn, open_slot)
            if RECORD:
                _live[scenario].save()
        return _live[scenario]

    return live


# ------------------------------------------------------------------ helpers


def decode_all(messages: list[tuple[int, bytes]]) -> list[PgOutputMessage]:
    decoder = PgOutputDecoder()
    return [decoder.decode(m) for _, m in messages]


def assemble(messages: list[tuple[int, bytes]], spool: Path) -> list[list[AssembledItem]]:
    """Items per fed message (so tests can see *when* something was emitted)."""
    asm = TransactionAssembler(spool)
    out = [list(asm.feed(lsn, m)) for lsn, m in messages]
    asm.close()
    return out


def flat(per_message: list[list[AssembledItem]]) -> list[AssembledItem]:
    return [item for items in per_message for item in items]


def transactions(
    items: list[AssembledItem],
) -> list[tuple[TransactionStart, list[AssembledItem], TransactionEnd]]:
    out = []
    start: TransactionStart | None = None
    body: list[AssembledItem] = []
    for item in items:
        if isinstance(item, TransactionStart):
            start, body = item, []
        elif isinstance(item, TransactionEnd):
            assert start is not None and start.xid == item.xid
            out.append((start, body, item))
            start = None
        elif start is not None:
            body.append(item)
    return out


def changes_of(items: list[AssembledItem], table: str) -> list[RowChange]:
    return [i for i in items if isinstance(i, RowChange) and i.table == table]


# ------------------------------------------------------------------ dml


def test_every_message_type_of_ordinary_transactions_decodes(
    recording: Callable[[str], Recording],
) -> None:
    kinds = {type(m) for m in decode_all(recording("dml").messages)}
    assert kinds == {Begin, Commit, Relation, Insert, Update, Delete, Truncate, Message, Origin}


def test_relation_message_describes_columns_and_key(recording: Callable[[str], Recording]) -> None:
    rel = next(m for m in decode_all(recording("dml").messages) if isinstance(m, Relation))
    assert rel.name == "items" and rel.namespace.startswith("dec_") and rel.xid is None
    assert rel.replica_identity == "d"
    assert [(c.name, c.type_oid, c.is_key) for c in rel.columns] == [
        ("id", 23, True), ("name", 25, False), ("qty", 23, False), ("note", 25, False),
    ]  # fmt: skip


def test_insert_carries_text_values_and_nulls(recording: Callable[[str], Recording]) -> None:
    inserts = [m for m in decode_all(recording("dml").messages) if isinstance(m, Insert)]
    assert inserts[0].new == (b"1", b"a", b"1", b"x" * 10000)
    assert inserts[1].new == (b"2", b"b", None, None)


def test_begin_and_commit_agree_on_the_commit_lsn(recording: Callable[[str], Recording]) -> None:
    msgs = decode_all(recording("dml").messages)
    begins = [m for m in msgs if isinstance(m, Begin)]
    commits = [m for m in msgs if isinstance(m, Commit)]
    assert len(begins) == len(commits) > 5
    for b, c in zip(begins, commits, strict=True):
        assert b.final_lsn == c.commit_lsn < c.end_lsn
        assert b.commit_ts == c.commit_ts
    # microseconds since 2000-01-01: a commit made after 2025
    assert pg_us_to_unix_ms(begins[0].commit_ts) > 1_735_689_600_000


def test_update_leaves_unchanged_toast_out_and_names_it(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    msgs = decode_all(recording("dml").messages)
    update = next(m for m in msgs if isinstance(m, Update))
    assert update.new[3] is UNCHANGED_TOAST and update.old is None
    change = changes_of(flat(assemble(recording("dml").messages, tmp_path)), "items")[2]
    assert change.op == "u"
    assert change.after == {"id": 1, "name": "a", "qty": 5}
    assert change.unavailable == ("note",) and change.before is None


def test_update_of_the_key_sends_the_old_key(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    update = [m for m in decode_all(recording("dml").messages) if isinstance(m, Update)][1]
    assert update.old_kind == "K" and update.old == (b"2", None, None, None)
    change = changes_of(flat(assemble(recording("dml").messages, tmp_path)), "items")[3]
    assert change.before == {"id": 2} and change.after == {
        "id": 3,
        "name": "b",
        "qty": None,
        "note": None,
    }
    assert change.key == ("id",)


def test_delete_sends_the_old_key(recording: Callable[[str], Recording], tmp_path: Path) -> None:
    delete = next(m for m in decode_all(recording("dml").messages) if isinstance(m, Delete))
    assert delete.old_kind == "K"
    change = changes_of(flat(assemble(recording("dml").messages, tmp_path)), "items")[4]
    assert (change.op, change.before, change.after) == ("d", {"id": 3}, None)


def test_replica_identity_full_sends_the_whole_old_row(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    ops = [
        (c.op, c.before, c.after, c.key)
        for c in changes_of(flat(assemble(recording("dml").messages, tmp_path)), "fullrow")
    ]
    # REPLICA IDENTITY FULL flags every column as part of the key
    assert ops == [
        ("c", None, {"id": 1, "v": "x"}, ("id", "v")),
        ("u", {"id": 1, "v": "x"}, {"id": 1, "v": "y"}, ("id", "v")),
        ("d", {"id": 1, "v": "y"}, None, ("id", "v")),
    ]
    old_kinds = [
        m.old_kind for m in decode_all(recording("dml").messages) if isinstance(m, (Update, Delete))
    ]
    assert old_kinds == [None, "K", "K", "O", "O", None]


def test_logical_messages_transactional_and_not(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    msgs = [m for m in decode_all(recording("dml").messages) if isinstance(m, Message)]
    assert [(m.transactional, m.prefix, m.content, m.xid) for m in msgs] == [
        (True, "dec", b"in-tx", None),
        (False, "dec", b"outside", None),
    ]
    items = flat(assemble(recording("dml").messages, tmp_path))
    txs = transactions(items)
    in_tx = [(s, body) for s, body, _ in txs if any(isinstance(i, LogicalMessage) for i in body)]
    assert len(in_tx) == 1
    start, body = in_tx[0]
    lm = body[0]
    assert isinstance(lm, LogicalMessage)
    assert (lm.txid, lm.commit_lsn, lm.content) == (start.xid, start.commit_lsn, b"in-tx")
    outside = [i for i in items if isinstance(i, LogicalMessage) and not i.transactional]
    assert [(o.content, o.txid) for o in outside] == [(b"outside", 0)]


def test_schema_changes_mid_stream_are_honoured(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    items = changes_of(flat(assemble(recording("dml").messages, tmp_path)), "items")
    after = {c.after["id"]: c.after for c in items if c.after}
    assert after[5] == {"id": 5, "name": "e", "qty": 5, "note": None, "extra": "1.5"}
    assert after[6] == {"id": 6, "name": "f", "note": None, "extra": "now text"}
    relations = [
        m
        for m in decode_all(recording("dml").messages)
        if isinstance(m, Relation) and m.name == "items"
    ]
    assert [c.type_oid for c in relations[-1].columns if c.name == "extra"] == [25]


def test_truncate_lists_relations_and_options(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    truncate = next(m for m in decode_all(recording("dml").messages) if isinstance(m, Truncate))
    assert truncate.cascade and truncate.restart_identity and len(truncate.relation_ids) == 2
    changes = [
        i
        for i in flat(assemble(recording("dml").messages, tmp_path))
        if isinstance(i, RowChange) and i.op == "t"
    ]
    assert sorted(c.table for c in changes) == ["child", "parent"]
    assert [c.seq for c in changes] == [0, 1]


def test_origin_message_names_the_origin(recording: Callable[[str], Recording]) -> None:
    rec = recording("dml")
    origin = next(m for m in decode_all(rec.messages) if isinstance(m, Origin))
    assert origin.name == rec.notes["origin"] and origin.commit_lsn == parse_lsn("1/2")


def test_changes_are_stamped_with_their_transaction(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    for start, body, end in transactions(flat(assemble(recording("dml").messages, tmp_path))):
        changes = [c for c in body if isinstance(c, RowChange)]
        assert [c.seq for c in changes] == list(range(len(changes))) == list(range(end.changes))
        for c in changes:
            assert (c.txid, c.commit_lsn, c.commit_ts_ms) == (
                start.xid,
                start.commit_lsn,
                start.commit_ts_ms,
            )
            assert c.snapshot is None
        assert end.commit_lsn == start.commit_lsn and not start.streamed


# ------------------------------------------------------------------ value types


@pytest.mark.parametrize(
    "case", range(len(VALUE_CASES["cases"])), ids=lambda i: VALUE_CASES["cases"][i]["type"]
)
def test_value_type_decodes_to_json_ready_value(
    recording: Callable[[str], Recording], tmp_path: Path, case: int
) -> None:
    expected = VALUE_CASES["cases"][case]
    row, null_row = changes_of(flat(assemble(recording("types").messages, tmp_path)), "vals")
    assert row.after is not None and null_row.after is not None
    assert row.after[f"c{case}"] == expected["expected"], expected["sql"]
    assert row.unconverted == ()
    assert null_row.after[f"c{case}"] is None


def test_values_decode_the_same_under_other_session_settings(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    """TimeZone, IntervalStyle 'postgres' and bytea_output 'escape' are parsed too; a
    non-ISO DateStyle is reported as unconverted, never guessed."""
    rec = recording("types")
    (row, _) = changes_of(flat(assemble(rec.messages, tmp_path / "a")), "vals")
    (alt, _) = changes_of(flat(assemble(rec.alt_messages, tmp_path / "b")), "vals")
    assert rec.alt_session["DateStyle"] == "ISO, DMY"  # ISO output ignores the DMY part
    assert alt.after == row.after
    assert alt.unconverted == ()


def test_user_types_are_announced_by_type_messages(recording: Callable[[str], Recording]) -> None:
    types = [m for m in decode_all(recording("types").messages) if isinstance(m, Type)]
    assert sorted(t.name for t in types) == ["_mood", "mood"]


# ------------------------------------------------------------------ streaming (v2)


def test_streamed_transactions_use_the_stream_messages(
    recording: Callable[[str], Recording],
) -> None:
    msgs = decode_all(recording("stream").messages)
    kinds = {type(m) for m in msgs}
    assert {StreamStart, StreamStop, StreamCommit, StreamAbort, Insert, Relation, Message} <= kinds
    # inside a stream block row messages carry the (sub)transaction xid; outside they do not
    in_stream = False
    for m in msgs:
        if isinstance(m, StreamStart):
            in_stream = True
        elif isinstance(m, StreamStop):
            in_stream = False
        elif isinstance(m, (Insert, Relation, Message)):
            assert (m.xid is not None) == in_stream


def test_streamed_transaction_is_emitted_only_at_stream_commit(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    rec = recording("stream")
    per_message = assemble(rec.messages, tmp_path)
    decoded = decode_all(rec.messages)
    for msg, items in zip(decoded, per_message, strict=True):
        if any(isinstance(i, RowChange) for i in items):
            # rows come from an ordinary Insert or from the Stream Commit replay
            assert isinstance(msg, (StreamCommit, Insert))
            if isinstance(msg, Insert):
                assert msg.xid is None
    big = [t for t in transactions(flat(per_message)) if t[0].xid == rec.notes["big"]]
    assert len(big) == 1
    start, body, end = big[0]
    rows = [c for c in body if isinstance(c, RowChange)]
    assert start.streamed and [c.after["id"] for c in rows if c.after] == list(
        range(1, STREAM_ROWS + 1)
    )
    assert [c.seq for c in rows] == list(range(STREAM_ROWS)) and end.changes == STREAM_ROWS
    assert all((c.txid, c.commit_lsn) == (start.xid, start.commit_lsn) for c in rows)
    messages = [i for i in body if isinstance(i, LogicalMessage)]
    assert [(m.content, m.txid) for m in messages] == [(b"inside big", start.xid)]
    assert list(tmp_path.iterdir()) == []


def test_rolled_back_subtransaction_of_a_streamed_transaction_is_dropped(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    rec = recording("stream")
    msgs = decode_all(rec.messages)
    aborts = [m for m in msgs if isinstance(m, StreamAbort)]
    assert any(a.xid == rec.notes["savepoint"] and a.subxid != a.xid for a in aborts)
    (tx,) = [
        t
        for t in transactions(flat(assemble(rec.messages, tmp_path)))
        if t[0].xid == rec.notes["savepoint"]
    ]
    ids = [c.after["id"] for c in tx[1] if isinstance(c, RowChange) and c.after]
    assert ids == list(range(10001, 10001 + STREAM_ROWS)) + list(range(30001, 30001 + STREAM_ROWS))


def test_aborted_streamed_transaction_emits_nothing(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    rec = recording("stream")
    aborts = [m for m in decode_all(rec.messages) if isinstance(m, StreamAbort)]
    assert any(a.xid == a.subxid == rec.notes["aborted"] for a in aborts)
    items = flat(assemble(rec.messages, tmp_path))
    assert not [t for t in transactions(items) if t[0].xid == rec.notes["aborted"]]
    assert not [
        c for c in items if isinstance(c, RowChange) and c.after and 40001 <= c.after["id"] < 42000
    ]
    assert list(tmp_path.iterdir()) == []


def test_interleaved_streamed_transactions_come_out_whole_in_commit_order(
    recording: Callable[[str], Recording], tmp_path: Path
) -> None:
    rec = recording("stream")
    starts = [m for m in decode_all(rec.messages) if isinstance(m, StreamStart)]
    first_open = [s for s in starts if s.xid == rec.notes["first_open"]]
    assert len(first_open) >= 2 and first_open[0].first_segment and not first_open[1].first_segment
    txs = transactions(flat(assemble(rec.messages, tmp_path)))
    order = [t[0].xid for t in txs]
    # B (and the small one) committed before A
    assert order.index(rec.notes["first_committed"]) < order.index(rec.notes["first_open"])
    commit_lsns = [t[2].commit_lsn for t in txs]
    assert commit_lsns == sorted(commit_lsns)
    by_xid = {
        t[0].xid: [c.after["id"] for c in t[1] if isinstance(c, RowChange) and c.after] for t in txs
    }
    n = STREAM_ROWS
    assert by_xid[rec.notes["first_open"]] == list(range(50001, 50001 + n)) + list(
        range(51001, 51001 + n)
    )
    assert by_xid[rec.notes["first_committed"]] == list(range(60001, 60001 + n)) + list(
        range(61001, 61001 + n)
    )
    small = [t for t in txs if not t[0].streamed]
    assert len(small) == 1 and by_xid[small[0][0].xid] == [1]


# ------------------------------------------------------------------ other options (live only)


def _ordinary_changes(messages: list[tuple[int, bytes]], spool: Path) -> list[RowChange]:
    return [i for i in flat(assemble(messages, spool)) if isinstance(i, RowChange)]


def test_protocol_version_1_decodes_like_version_2(
    cdc_conn: psycopg.Connection, test_schema: str, logical_slot: Callable[..., Any], tmp_path: Path
) -> None:
    cdc_conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(test_schema)))
    cdc_conn.execute("CREATE TABLE v (id int PRIMARY KEY, t text, n numeric)")
    v1 = logical_slot([f"{test_schema}.v"], proto_version="1", streaming="off")
    v2 = logical_slot([f"{test_schema}.v"])
    cdc_conn.execute("INSERT INTO v VALUES (1, 'a', 1.5), (2, NULL, NULL)")
    cdc_conn.execute("UPDATE v SET t = 'b' WHERE id = 1")
    cdc_conn.execute("DELETE FROM v WHERE id = 2")
    old = _ordinary_changes(v1.peek(**DECODING_SESSION), tmp_path / "v1")
    new = _ordinary_changes(v2.peek(**DECODING_SESSION), tmp_path / "v2")
    assert (
        [(c.op, c.before, c.after) for c in old]
        == [(c.op, c.before, c.after) for c in new]
        == [
            ("c", None, {"id": 1, "t": "a", "n": "1.5"}),
            ("c", None, {"id": 2, "t": None, "n": None}),
            ("u", None, {"id": 1, "t": "b", "n": "1.5"}),
            ("d", {"id": 2}, None),
        ]
    )


def test_binary_format_values_are_kept_as_base64_and_flagged(
    cdc_conn: psycopg.Connection, test_schema: str, logical_slot: Callable[..., Any], tmp_path: Path
) -> None:
    cdc_conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(test_schema)))
    cdc_conn.execute("CREATE TABLE b (id int PRIMARY KEY)")
    slot = logical_slot([f"{test_schema}.b"], binary="true")
    cdc_conn.execute("INSERT INTO b VALUES (258)")
    (change,) = _ordinary_changes(slot.peek(**DECODING_SESSION), tmp_path)
    assert change.after == {"id": "AAABAg=="}  # int4 258 in network byte order
    assert change.unconverted == ("id",)


def test_streamed_transaction_from_a_replication_origin(
    cdc_conn: psycopg.Connection, test_schema: str, logical_slot: Callable[..., Any], tmp_path: Path
) -> None:
    """pgoutput sends an Origin message inside the first stream block of such a transaction."""
    cdc_conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(test_schema)))
    cdc_conn.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    slot = logical_slot([f"{test_schema}.big"])
    origin = unique_name("dec_origin")
    cdc_conn.execute("SELECT pg_replication_origin_create(%s)", (origin,))
    try:
        cdc_conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origin,))
        cdc_conn.execute(
            f"INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, {STREAM_ROWS}) g"
        )
        cdc_conn.execute("SELECT pg_replication_origin_session_reset()")
    finally:
        cdc_conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))
    messages = slot.peek(logical_decoding_work_mem="64kB", **DECODING_SESSION)
    decoded = decode_all(messages)
    first = next(i for i, m in enumerate(decoded) if isinstance(m, StreamStart))
    assert isinstance(decoded[first + 1], Origin) and decoded[first + 1].name == origin
    changes = _ordinary_changes(messages, tmp_path)
    assert [c.after["id"] for c in changes if c.after] == list(range(1, STREAM_ROWS + 1))
