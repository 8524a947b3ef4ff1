"""Backlog drain: >= 1M row changes waiting in the slot, then time the capture
from start to everything acknowledged by Kafka, and time pg_recvlogical reading
the same backlog to /dev/null (the server's own decoding rate: the ceiling for
one slot). Prints a JSON summary.

    python -m bench.capture_drain [--orders 200000] [--items 4] [--per-tx 100]

Runs against its own database (bench_capture) on the local stack.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.lsn import parse_lsn

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")
DB = "bench_capture"


def dsn_for(db: str) -> str:
    params = conninfo_to_dict(PG_DSN)
    params["dbname"] = db
    return make_conninfo(**params)  # type: ignore[arg-type]


def pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return name


def setup(orders: int, items: int, per_tx: int, name: str) -> tuple[int, int]:
    """Fresh database, two slots at the same position, then the backlog. Returns
    (row changes written, end LSN)."""
    with psycopg.connect(dsn_for("postgres"), autocommit=True) as c:
        for (slot,) in c.execute("select slot_name from pg_replication_slots where database = %s", (DB,)).fetchall():
            c.execute("select pg_drop_replication_slot(%s)", (slot,))
        c.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(DB)))
        c.execute(sql.SQL("create database {}").format(sql.Identifier(DB)))
    dsn = dsn_for(DB)
    subprocess.run([sys.executable, "-m", "writer", "migrate", "--dsn", dsn], check=True, cwd=ROOT, capture_output=True)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            """insert into customers (email, full_name, profile, bio)
               select 'c' || g || '@example.com', 'Customer ' || g, '{}', 'bio' from generate_series(1, 1000) g"""
        )
        c.execute(
            """insert into products (sku, name, category, price, stock, attributes, description)
               select 'SKU-' || g, 'Product ' || g, 'cat', 9.99, 100000000, '{}', 'd' from generate_series(1, 1000) g"""
        )
        c.execute(sql.SQL("create publication {} for table customers, products, orders, order_items, payments").format(sql.Identifier(name)))
        for slot in (name, f"{name}_recv"):
            c.execute("select pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        # the capture finds a slot whose snapshot is complete: it streams at once
        from cdc.snapshot_state import SnapshotState

        SnapshotState(c, name).finish(0)
        t = time.perf_counter()
        changes = 0
        for start in range(0, orders, per_tx):
            n = min(per_tx, orders - start)
            with c.transaction():
                c.execute(
                    """with o as (
                         insert into orders (customer_id, status, currency, subtotal, tax, shipping_fee, total, shipping_address)
                         select 1 + (g %% 1000), 'pending', 'EUR', 39.96, 0, 0, 39.96, '{"city": "Lyon"}'
                           from generate_series(1, %s) g returning id)
                       insert into order_items (order_id, line_no, product_id, quantity, unit_price, line_total)
                       select o.id, l, 1 + ((o.id + l) %% 1000), 1, 9.99, 9.99 from o, generate_series(1, %s) l""",
                    (n, items),
                )
            changes += n * (1 + items)
        row = c.execute("select pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        print(f"backlog: {changes} row changes in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        return changes, parse_lsn(row[0])


def confirmed(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = %s", (slot,)).fetchone()
        assert row is not None
        return parse_lsn(row[0])


def time_recvlogical(name: str, end_lsn: int) -> float:
    params = conninfo_to_dict(dsn_for(DB))
    cmd = [
        pg_bin("pg_recvlogical"), "-h", str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", "5432")),
        "-U", str(params.get("user", "postgres")), "-d", DB, "--slot", f"{name}_recv", "--start",
        "-o", "proto_version=1", "-o", f"publication_names={name}", "-f", "/dev/null",
        "-E", f"{end_lsn >> 32:X}/{end_lsn & 0xFFFFFFFF:X}", "--no-loop",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def time_capture(name: str, end_lsn: int) -> tuple[float, float, float]:
    env = dict(os.environ, PG_DSN=dsn_for(DB), CDC_SLOT=name, CDC_PUBLICATION=name, CDC_TOPIC_PREFIX=name, CDC_METRICS_PORT="0")
    log = (ROOT / ".local" / f"bench-{name}.log").open("wb")
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "cdc", "run"]
    if os.environ.get("BENCH_PROFILE"):
        # collapsed stacks for a profile of where the time goes (py-spy, sampling)
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw", "-r", "200",
               "-o", os.environ["BENCH_PROFILE"], "--", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_kb = 0
    try:
        while confirmed(dsn_for(DB), name) < end_lsn:
            if proc.poll() is not None:
                raise SystemExit(f"capture exited early; see {log.name}")
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = int(line.split()[1])
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    finally:
        proc.send_signal(2)
        proc.wait(30)
    return elapsed, peak_kb / 1024, cpu_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--per-tx", type=int, default=100)
    args = ap.parse_args()
    name = f"bench_{int(time.time())}"
    changes, end_lsn = setup(args.orders, args.items, args.per_tx, name)
    recv_s = time_recvlogical(name, end_lsn)
    load_before = os.getloadavg()[0]
    cdc_s, rss_mb, cpu_s = time_capture(name, end_lsn)
    result = {
        "benchmark": "capture_backlog_drain",
        "row_changes": changes,
        "transactions": -(-args.orders // args.per_tx),
        "pg_recvlogical_s": round(recv_s, 2),
        "pg_recvlogical_changes_per_s": round(changes / recv_s),
        "cdc_s": round(cdc_s, 2),
        "cdc_changes_per_s": round(changes / cdc_s),
        "cdc_vs_pg_recvlogical": round(recv_s / cdc_s, 3),
        "cdc_max_rss_mb": round(rss_mb, 1),
        "cdc_cpu_s": round(cpu_s, 2),
        "cdc_cpu_us_per_change": round(cpu_s * 1e6 / changes, 1),
        "load_average_before": round(load_before, 2),
        "targets": {"cdc_vs_pg_recvlogical": ">= 0.5", "cdc_max_rss_mb": "< 300"},
    }
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
