"""The capture process against real Postgres and Kafka: what it promises end to end."""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from tests.cdc.capture_harness import (
    CdcProcess,
    EventLog,
    current_lsn,
    delete_topics,
    fresh_shop_database,
    read_tables,
    rebuild_tables,
)

KEYS = {
    "customers": ("id",),
    "products": ("id",),
    "orders": ("id",),
    "order_items": ("order_id", "line_no"),
    "payments": ("id",),
}


@pytest.fixture(scope="module")
def shop_dsn() -> str:
    dsn = fresh_shop_database("capture_test")
    with psycopg.connect(dsn, autocommit=True) as c:
        seed(c, customers=3000, products=500)
    return dsn


@pytest.fixture
def cdc(shop_dsn: str) -> Iterator[CdcProcess]:
    proc = CdcProcess(shop_dsn)
    yield proc
    proc.cleanup()


@pytest.fixture
def conn(shop_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(shop_dsn, autocommit=True) as c:
        yield c


def seed(conn: psycopg.Connection, customers: int, products: int) -> None:
    conn.execute(
        """insert into customers (email, full_name, profile, bio)
           select 'c' || g || '-' || md5(random()::text) || '@example.com', 'Customer ' || g,
                  jsonb_build_object('n', g), repeat('long biography ', 300 + g %% 7)
             from generate_series(1, %s) g""",
        (customers,),
    )
    conn.execute(
        """insert into products (sku, name, category, price, stock, attributes, description)
           select 'SKU-' || upper(substr(md5(random()::text), 1, 20)), 'Product ' || g, 'cat' || (g %% 5), (g %% 100) + 0.99,
                  1000000, '{}', 'description ' || g
             from generate_series(1, %s) g""",
        (products,),
    )


class Churn:
    """Concurrent writes in a thread; a failure in the thread fails the test."""

    def __init__(self, dsn: str, seed_value: int) -> None:
        self.stop_event = threading.Event()
        self.count = [0]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(dsn, seed_value))

    def _run(self, dsn: str, seed_value: int) -> None:
        try:
            churn(dsn, self.stop_event, seed_value, self.count)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Churn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()
        if self.error is not None:
            raise self.error


def churn(dsn: str, stop: threading.Event, seed_value: int, counter: list[int]) -> None:
    """Concurrent writes: new orders with items, status changes, profile and price edits."""
    rng = random.Random(seed_value)
    with psycopg.connect(dsn, autocommit=True) as c:
        cust = [r[0] for r in c.execute("select id from customers").fetchall()]
        prod = [r[0] for r in c.execute("select id from products").fetchall()]
        while not stop.is_set():
            with c.transaction():
                row = c.execute(
                    """insert into orders (customer_id, status, currency, subtotal, tax, shipping_fee, total, shipping_address)
                       values (%s, 'pending', 'EUR', 10.00, 2.00, 1.00, 13.00, '{"city": "Lyon"}') returning id""",
                    (rng.choice(cust),),
                ).fetchone()
                assert row is not None
                for line in range(1, rng.randint(1, 4) + 1):
                    c.execute(
                        "insert into order_items (order_id, line_no, product_id, quantity, unit_price, line_total) values (%s, %s, %s, 1, 10.00, 10.00)",
                        (row[0], line, rng.choice(prod)),
                    )
            if rng.random() < 0.5:
                c.execute("update orders set status = 'paid', paid_at = now() where id = %s", (row[0],))
            if rng.random() < 0.3:
                c.execute("update customers set full_name = %s where id = %s", (f"Renamed {rng.random():.6f}", rng.choice(cust)))
            if rng.random() < 0.2:
                c.execute("update products set price = price + 1 where id = %s", (rng.choice(prod),))
            counter[0] += 1


def assert_topics_rebuild_postgres(log: EventLog, dsn: str) -> None:
    rebuilt = rebuild_tables(log.changes(), KEYS)
    actual = read_tables(dsn, list(KEYS))
    for table in KEYS:
        got, want = rebuilt.get(table, {}), actual[table]
        missing = set(want) - set(got)
        extra = set(got) - set(want)
        differing = [k for k in set(want) & set(got) if want[k] != got[k]]
        assert not missing and not extra and not differing, (
            f"{table}: {len(missing)} rows missing from the topics, {len(extra)} extra, {len(differing)} differ; "
            f"e.g. missing {sorted(missing)[:3]}, differing {[(want[k], got[k]) for k in differing[:1]]}"
        )


def test_snapshot_with_concurrent_writes_has_no_gap_and_no_duplicate(cdc: CdcProcess, shop_dsn: str) -> None:
    with Churn(shop_dsn, 1) as writes:
        time.sleep(0.5)
        cdc.extra_env["CDC_SNAPSHOT_CHUNK"] = "200"  # many chunks, so writes land mid-snapshot
        cdc.start()
        time.sleep(4)
    assert writes.count[0] > 20, "the concurrent writer should have committed during the snapshot"
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    assert_topics_rebuild_postgres(log, shop_dsn)
    # no duplicate: every row change appears once (no restarts happened)
    seen = Counter(
        (c["source"]["table"], c["source"]["commit_lsn"], c["source"]["seq"], c["op"], str(c["after"] or c["before"]))
        for c in log.changes()
    )
    dupes = [k for k, n in seen.items() if n > 1]
    assert not dupes, f"{len(dupes)} changes were published twice, e.g. {dupes[:2]}"
    ids = Counter(e["event_id"] for e in log.events)
    assert all(n == 1 for n in ids.values())
    log.close()


def test_kill_9_mid_stream_then_restart_loses_no_change(cdc: CdcProcess, shop_dsn: str) -> None:
    cdc.start()
    with Churn(shop_dsn, 2):
        time.sleep(3)
        cdc.kill9()
        time.sleep(1)
        cdc.start()
        time.sleep(3)
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    assert_topics_rebuild_postgres(log, shop_dsn)
    # at-least-once: a re-sent event is the same event (same id, same content)
    by_id: dict[str, bytes] = {}
    for e in log.events:
        import orjson

        blob = orjson.dumps(e, option=orjson.OPT_SORT_KEYS)
        assert by_id.setdefault(e["event_id"], blob) == blob, f"event {e['event_id']} was re-sent with other content"
    log.close()


def test_unchanged_toast_value_is_absent_not_null(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    conn.execute(
        "insert into customers (email, full_name, profile, bio) values ('toast@example.com', 'T', '{}', %s)",
        ("".join(random.choice("abcdefghij") for _ in range(40_000)),),
    )
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    conn.execute("update customers set full_name = 'Toast Renamed' where email = 'toast@example.com'")
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    updates = [
        c for c in log.changes() if c["op"] == "u" and c["source"]["table"] == "customers" and c["after"]["full_name"] == "Toast Renamed"
    ]
    assert len(updates) == 1
    change = updates[0]
    assert "bio" not in change["after"], "an unchanged TOAST value must not be sent as null"
    assert change["unavailable"] == ["bio"]
    event = next(e for e in log.events if change in e["changes"])
    assert event["event_type"] == "CustomerProfileChanged"
    assert "bio" not in event["data"].get("changed", {})
    log.close()


def test_schema_change_mid_stream_is_honoured(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    conn.execute("alter table products add column weight_kg numeric(8,3)")
    try:
        conn.execute("insert into products (sku, name, category, price, stock, attributes, description, weight_kg) values ('SKU-W', 'Weighed', 'x', 1.00, 1, '{}', 'd', 2.125)")
        conn.execute("alter table products alter column stock type bigint")
        conn.execute("update products set stock = 5000000000 where sku = 'SKU-W'")
        conn.execute("alter table products drop column weight_kg")
        conn.execute("update products set name = 'Unweighed' where sku = 'SKU-W'")
        log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    finally:
        conn.execute("alter table products drop column if exists weight_kg")
        conn.execute("alter table products alter column stock type integer using least(stock, 2147483647)")
    mine = [c for c in log.changes() if c["source"]["table"] == "products" and (c["after"] or {}).get("sku") == "SKU-W"]
    assert [c["op"] for c in mine] == ["c", "u", "u"]
    assert mine[0]["after"]["weight_kg"] == "2.125"
    assert mine[1]["after"]["stock"] == 5000000000
    assert "weight_kg" not in mine[2]["after"] and mine[2]["after"]["name"] == "Unweighed"
    assert cdc.alive()
    log.close()


def test_new_table_in_publication_gets_generic_events(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    conn.execute("create table if not exists gift_cards (code text primary key, balance numeric(12,2), tags text[])")
    try:
        # full before-images: pgoutput then flags every column as key, but the
        # primary key still identifies the row
        cdc.extra_env["CDC_FULL_IDENTITY"] = "customers,products,gift_cards"
        cdc.start()
        ready = EventLog(cdc.prefix)
        ready.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
        ready.close()
        log = EventLog(cdc.prefix, aggregates=("gift_cards",))
        conn.execute("insert into gift_cards values ('GC-1', 25.00, '{a,b}')")
        conn.execute("update gift_cards set balance = 20.00 where code = 'GC-1'")
        conn.execute("delete from gift_cards where code = 'GC-1'")
        log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
        assert [e["event_type"] for e in log.events] == ["RowInserted", "RowUpdated", "RowDeleted"]
        assert {e["aggregate_id"] for e in log.events} == {"GC-1"}
        assert log.events[1]["changes"][0]["before"]["balance"] == "25.00"
        assert log.events[0]["changes"][0]["after"] == {"code": "GC-1", "balance": "25.00", "tags": ["a", "b"]}
        log.close()
    finally:
        cdc.stop()
        conn.execute("drop table gift_cards")


def test_missing_slot_after_streaming_is_a_clear_error(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    log.close()
    cdc.stop()
    conn.execute("select pg_drop_replication_slot(%s)", (cdc.name,))
    result = cdc.run_to_end("run", timeout=60)
    assert result.returncode == 1
    assert f'slot "{cdc.name}" is missing' in result.stderr
    assert "python -m cdc reset --yes" in result.stderr
    assert "Traceback" not in result.stderr
    reset = cdc.run_to_end("reset", "--yes")
    assert reset.returncode == 0, reset.stderr
    assert f'dropped publication "{cdc.name}"' in reset.stdout


def test_idle_published_tables_still_advance_the_slot(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    conn.execute("create table if not exists unpublished_churn (id bigserial primary key, payload text)")
    cdc.extra_env["CDC_TABLES"] = "customers"
    cdc.start()
    log = EventLog(cdc.prefix, aggregates=("customer",))
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    for _ in range(20):
        conn.execute("insert into unpublished_churn (payload) select repeat('x', 1000) from generate_series(1, 500)")
    target = current_lsn(shop_dsn)
    deadline = time.monotonic() + 20
    confirmed = 0
    while time.monotonic() < deadline:
        row = conn.execute("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (cdc.name,)).fetchone()
        assert row is not None
        from cdc.lsn import parse_lsn

        confirmed = parse_lsn(row[0])
        if confirmed >= target:
            break
        time.sleep(0.3)
    assert confirmed >= target, f"slot stayed at {confirmed:X} while WAL moved to {target:X}"
    log.wait_for_watermark(target, timeout=10, proc=cdc)
    log.close()
    conn.execute("drop table unpublished_churn")


def test_watermarks_while_changes_flow_come_at_most_every_cdc_watermark_every_ms(
    cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str
) -> None:
    """CDC_WATERMARK_EVERY_MS: how often a Watermark follows the stream while it moves (a
    read with min_lsn waits for one). 300 ms here, against the default 50 and the idle 500."""
    cdc.extra_env["CDC_TABLES"] = "customers"
    cdc.extra_env["CDC_WATERMARK_EVERY_MS"] = "300"
    cdc.start()
    log = EventLog(cdc.prefix, aggregates=("customer",))
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    start_ms = time.time() * 1000
    end = time.monotonic() + 3
    while time.monotonic() < end:  # one transaction every few ms: the stream never rests
        conn.execute("update customers set full_name = %s where id = 1", (f"Tick {time.monotonic():.6f}",))
    end_ms = time.time() * 1000
    log.wait_for_watermark(current_lsn(shop_dsn), timeout=10, proc=cdc)
    log.close()
    first = sorted({(t, p) for t, p, _, _ in log.watermark_records})[0]
    stamps = sorted(ts for t, p, _, ts in log.watermark_records if (t, p) == first and start_ms <= ts <= end_ms)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(stamps) >= 5, f"{len(stamps)} Watermarks in 3 s of changes: {stamps}"
    assert min(gaps) >= 290, f"Watermarks closer than CDC_WATERMARK_EVERY_MS=300: {gaps}"
    assert sorted(gaps)[len(gaps) // 2] < 450, f"not the 300 ms of the setting: {gaps}"


def test_lost_walsender_connection_reconnects_without_loss(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    with Churn(shop_dsn, 3):
        time.sleep(2)
        killed = conn.execute(
            "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = %s and active", (cdc.name,)
        ).fetchall()
        assert killed == [(True,)]
        time.sleep(4)
    log.wait_for_watermark(current_lsn(shop_dsn), timeout=90, proc=cdc)
    assert cdc.alive()
    assert "reconnecting" in cdc.log()
    assert_topics_rebuild_postgres(log, shop_dsn)
    log.close()


def test_half_million_row_transaction_streams_through_in_bounded_memory(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    conn.execute("create table if not exists bulk_rows (id bigint primary key, payload text not null)")
    try:
        # a small decoding budget makes the server stream the transaction while it
        # runs (protocol v2): it is spooled to disk and published only at commit
        cdc.extra_env.update(CDC_TABLES="bulk_rows", CDC_DECODING_WORK_MEM="1MB")
        cdc.start()
        ready = EventLog(cdc.prefix, aggregates=("bulk_rows",))
        conn.execute("insert into bulk_rows values (0, 'warm-up')")  # creates the topic
        ready.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
        ready.close()
        conn.execute(
            "insert into bulk_rows select g, 'row ' || g || ' ' || repeat('p', 60) from generate_series(1, 500000) g"
        )
        end = current_lsn(shop_dsn)
        deadline = time.monotonic() + 240
        while True:
            row = conn.execute("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (cdc.name,)).fetchone()
            assert row is not None
            from cdc.lsn import parse_lsn

            if parse_lsn(row[0]) >= end:
                break
            assert cdc.alive(), cdc.log()[-3000:]
            assert time.monotonic() < deadline, "the 500k-row transaction was not confirmed within 240 s"
            time.sleep(0.5)
        peak = cdc.peak_rss_mb()
        assert peak < 300, f"capture peaked at {peak:.0f} MB of RSS"
        from confluent_kafka import Consumer, TopicPartition

        from tests.cdc.capture_harness import KAFKA

        counter = Consumer({"bootstrap.servers": KAFKA, "group.id": "count"})
        topic = f"{cdc.prefix}.bulk_rows.events"
        meta = counter.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            lo, hi = counter.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi - lo
        counter.close()
        # 500,001 row events, plus watermark records on each partition
        assert total >= 500_001
        log = EventLog(cdc.prefix, aggregates=("bulk_rows",))
        log.poll(2)
        while len(log.events) < 500_001:
            before = len(log.events)
            log.poll(3)
            assert len(log.events) > before, f"only {len(log.events)} events could be read"
        ids = {e["changes"][0]["after"]["id"] for e in log.events if e["changes"][0]["op"] in "cr"}
        assert ids == set(range(500_001))
        log.close()
    finally:
        cdc.stop()
        conn.execute("drop table if exists bulk_rows")


def test_kafka_down_pauses_capture_and_resumes_without_loss(cdc: CdcProcess, shop_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    import subprocess

    from tests.cdc.capture_harness import ROOT

    kafka_dir = ROOT / ".local" / f"kafka-{cdc.name}"
    env = dict(os.environ, KAFKA_DIR=str(kafka_dir), KAFKA_PORT="59192", KAFKA_CONTROLLER_PORT="59193")

    def broker(action: str) -> None:
        subprocess.run([str(ROOT / "stack" / "stack.sh"), action, "kafka"], env=env, check=True, capture_output=True)

    broker("up")
    try:
        cdc.extra_env["KAFKA_BOOTSTRAP"] = "127.0.0.1:59192"
        cdc.start()
        log = EventLog(cdc.prefix, bootstrap="127.0.0.1:59192")
        log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
        log.close()
        broker("down")
        with Churn(shop_dsn, 4) as writes:
            time.sleep(5)
        assert writes.count[0] > 10
        down_until = current_lsn(shop_dsn)
        with psycopg.connect(shop_dsn, autocommit=True) as c:
            row = c.execute("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (cdc.name,)).fetchone()
        from cdc.lsn import parse_lsn

        assert row is not None and parse_lsn(row[0]) < down_until, "nothing may be confirmed while Kafka is down"
        assert cdc.alive(), "Kafka being down must not crash the capture"
        broker("up")
        log = EventLog(cdc.prefix, bootstrap="127.0.0.1:59192")
        log.wait_for_watermark(current_lsn(shop_dsn), timeout=120, proc=cdc)
        assert_topics_rebuild_postgres(log, shop_dsn)
        log.close()
    finally:
        cdc.stop()
        broker("down")
        import shutil

        shutil.rmtree(kafka_dir, ignore_errors=True)


def test_slot_invalidated_by_wal_limit_is_a_clear_error() -> None:
    """On a Postgres cluster of its own (max_slot_wal_keep_size = 1MB), so no other slot suffers."""
    import shutil
    import subprocess

    from tests.cdc.capture_harness import ROOT

    pg_dir = ROOT / ".local" / "pg-invalidation"
    # a port below Linux's ephemeral range (32768-60999): bound half way through the suite,
    # 55532 once failed because a client connection held it as its local port
    port = "25532"
    env = dict(os.environ, PG_DIR=str(pg_dir), PG_PORT=port, PG_MAX_SLOT_WAL_KEEP_SIZE="1MB", PG_SHARED_BUFFERS="32MB")
    stack = str(ROOT / "stack" / "stack.sh")
    up = subprocess.run([stack, "up", "postgres"], env=env, capture_output=True, text=True)
    assert up.returncode == 0, f"stack up postgres (port {port}) failed:\n{up.stdout}\n{up.stderr}"
    dsn = f"postgresql://postgres@127.0.0.1:{port}/shop"
    cdc = CdcProcess(dsn)
    try:
        subprocess.run([sys.executable, "-m", "writer", "migrate", "--dsn", dsn], cwd=ROOT, check=True, capture_output=True)
        cdc.start()
        log = EventLog(cdc.prefix)
        log.wait_for_watermark(current_lsn(dsn), proc=cdc)
        log.close()
        cdc.stop()
        with psycopg.connect(dsn, autocommit=True) as conn:
            # the slot falls behind max_slot_wal_keep_size while nobody reads it
            conn.execute("create table wal_filler (id bigserial primary key, payload text)")
            for _ in range(4):
                conn.execute("insert into wal_filler (payload) select repeat(md5(g::text), 40) from generate_series(1, 20000) g")
                conn.execute("select pg_switch_wal()")
                conn.execute("checkpoint")
            row = conn.execute("select wal_status from pg_replication_slots where slot_name = %s", (cdc.name,)).fetchone()
            assert row == ("lost",), f"slot should be invalidated, is {row}"
        result = cdc.run_to_end("run", timeout=60)
        assert result.returncode == 1
        assert "was invalidated" in result.stderr and "python -m cdc reset --yes" in result.stderr
        assert "Traceback" not in result.stderr
        status = cdc.run_to_end("status", "--json")
        assert status.returncode == 1 and '"wal_status": "lost"' in status.stdout
        assert cdc.run_to_end("reset", "--yes").returncode == 0
    finally:
        cdc.stop()
        delete_topics(cdc.prefix)
        subprocess.run([stack, "down", "postgres"], env=env, capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)

def _wait_snapshot_done(conn: psycopg.Connection, slot: str, cdc: CdcProcess, timeout: float = 120) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute(
            "select request_id, status, rows, coalesce(error, '') from readside_cdc.incremental_snapshots where slot = %s", (slot,)
        ).fetchall()
        if rows and all(r[1] == "done" for r in rows):
            return rows
        assert all(r[1] != "failed" for r in rows), rows
        assert cdc.alive(), cdc.log()[-3000:]
        assert time.monotonic() < deadline, f"incremental snapshot not done: {rows}\n{cdc.log()[-2000:]}"
        time.sleep(0.3)


def test_incremental_snapshot_racing_updates_never_leaves_a_stale_row(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.extra_env["CDC_SNAPSHOT_CHUNK"] = "100"
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    with Churn(shop_dsn, 5) as writes:
        requested = cdc.run_to_end("snapshot", "--tables", "customers,products")
        assert requested.returncode == 0, requested.stderr
        [(request, status, rows, _)] = _wait_snapshot_done(conn, cdc.name, cdc)
    assert writes.count[0] > 10
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    reads = [c for c in log.changes() if c["op"] == "r" and c["source"]["snapshot"] == "incremental"]
    total = conn.execute("select (select count(*) from customers) + (select count(*) from products)").fetchone()
    assert total is not None
    # rows changed inside a chunk's window are left to the stream, the rest are read
    assert 0.5 * total[0] < len(reads) <= total[0]
    assert rows >= len(reads)
    assert_topics_rebuild_postgres(log, shop_dsn)
    # the newest version of every row equals the database: what a projection would hold
    newest: dict[tuple[str, object], tuple[int, dict]] = {}
    for event in log.events:
        for change in event["changes"]:
            if change["source"]["table"] not in ("customers", "products") or change["op"] == "d":
                continue
            key = (change["source"]["table"], change["after"]["id"])
            if key not in newest or event["version"] > newest[key][0]:
                newest[key] = (event["version"], change["after"])
    actual = read_tables(shop_dsn, ["customers", "products"])
    stale = [
        k for k, (_, after) in newest.items()
        if any(after.get(col) != actual[k[0]][(k[1],)].get(col) for col in after)
    ]
    assert not stale, f"{len(stale)} rows are older than their latest change, e.g. {stale[:3]}"
    status = cdc.run_to_end("snapshot", "--status", "--json")
    assert f'"request": "{request}"' in status.stdout and '"status": "done"' in status.stdout
    log.close()


def test_interrupted_initial_snapshot_resumes_while_streaming(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.extra_env["CDC_SNAPSHOT_CHUNK"] = "50"
    cdc.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            done = conn.execute(
                "select count(*) filter (where finished_at is not null), count(*) from readside_cdc.snapshot_tables where slot = %s",
                (cdc.name,),
            ).fetchone()
        except psycopg.errors.UndefinedTable:  # the capture has not created its state yet
            done = None
        if done is not None and done[0] >= 1:
            break
        assert time.monotonic() < deadline and cdc.alive(), cdc.log()[-2000:]
        time.sleep(0.05)
    assert done[0] < done[1], "the snapshot finished before it could be interrupted"
    cdc.kill9()
    # the rest is read in bigger chunks: the database has grown with every test before
    cdc.extra_env["CDC_SNAPSHOT_CHUNK"] = "2000"
    with Churn(shop_dsn, 6):
        cdc.start()
        _wait_snapshot_done(conn, cdc.name, cdc, timeout=240)
    assert "will be read as an incremental snapshot" in cdc.log()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    assert_topics_rebuild_postgres(log, shop_dsn)
    log.close()


def test_incremental_snapshot_killed_midway_resumes_and_reads_every_row(cdc: CdcProcess, conn: psycopg.Connection, shop_dsn: str) -> None:
    cdc.extra_env["CDC_SNAPSHOT_CHUNK"] = "25"
    cdc.start()
    log = EventLog(cdc.prefix)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    assert cdc.run_to_end("snapshot", "--tables", "customers").returncode == 0
    deadline = time.monotonic() + 60
    while True:  # some chunks done, most not
        row = conn.execute("select chunks from readside_cdc.incremental_snapshots where slot = %s", (cdc.name,)).fetchone()
        if row and row[0] >= 3:
            break
        assert time.monotonic() < deadline and cdc.alive(), cdc.log()[-2000:]
        time.sleep(0.1)
    cdc.kill9()
    # the restarted capture replays the killed session's watermarks: they must not count
    cdc.start()
    _wait_snapshot_done(conn, cdc.name, cdc, timeout=180)
    log.wait_for_watermark(current_lsn(shop_dsn), proc=cdc)
    read_ids = {c["after"]["id"] for c in log.changes() if c["op"] == "r" and c["source"]["snapshot"] == "incremental"}
    all_ids = {r[0] for r in conn.execute("select id from customers").fetchall()}
    assert read_ids == all_ids, f"{len(all_ids - read_ids)} customers were never read, e.g. {sorted(all_ids - read_ids)[:5]}"
    log.close()
