"""Test harness for the capture process: a shop database of its own, ``python -m cdc
run`` as a real subprocess (so it can be killed), and a Kafka reader that
rebuilds tables from the published events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.lsn import parse_lsn
from cdc.slot import TableInfo
from cdc.snapshot import SnapshotReader

ROOT = Path(__file__).resolve().parents[2]
PG_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")
KAFKA = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092")


def dsn_for(dbname: str) -> str:
    params = conninfo_to_dict(PG_DSN)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


def fresh_shop_database(name: str) -> str:
    """Drop and recreate a database with the writer's schema; return its DSN."""
    with psycopg.connect(dsn_for("postgres"), autocommit=True) as conn:
        for (slot,) in conn.execute(
            "select slot_name from pg_replication_slots where database = %s", (name,)
        ).fetchall():
            conn.execute("select pg_drop_replication_slot(%s)", (slot,))
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    dsn = dsn_for(name)
    subprocess.run([sys.executable, "-m", "writer", "migrate", "--dsn", dsn], check=True, cwd=ROOT, capture_output=True)
    return dsn


@dataclass
class CdcProcess:
    """``python -m cdc run`` with its own slot, publication and topic prefix."""

    dsn: str
    name: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def prefix(self) -> str:
        return self.name

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PG_DSN=self.dsn,
            KAFKA_BOOTSTRAP=KAFKA,
            CDC_SLOT=self.name,
            CDC_PUBLICATION=self.name,
            CDC_TOPIC_PREFIX=self.name,
            CDC_METRICS_PORT="0",
            CDC_SPOOL_DIR=str(ROOT / ".local" / "test-spool"),
        )
        env.update(self.extra_env)
        return env

    def start(self, *args: str) -> CdcProcess:
        self.log_path = ROOT / ".local" / "test-logs" / f"cdc-{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "run", *args], cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )
        return self

    def run_to_end(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cdc", *args], cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def cleanup(self) -> None:
        self.stop()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = %s and not active", (self.name,))
        delete_topics(self.prefix)


def delete_topics(prefix: str) -> None:
    """The topics (and dead-letter topics) of a prefix: left behind, a long-lived broker
    collected hundreds of them over the test runs."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": KAFKA})
    doomed = [n for n in admin.list_topics(timeout=10).topics if n.startswith(prefix + ".")]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            try:
                future.result(timeout=30)
            except Exception:  # best effort
                pass


class EventLog:
    """Reads every record of a prefix's topics from the beginning."""

    def __init__(self, prefix: str, aggregates: tuple[str, ...] = ("order", "customer", "product"), bootstrap: str = KAFKA) -> None:
        self.topics = [f"{prefix}.{a}.events" for a in aggregates]
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "topic.metadata.refresh.interval.ms": 1000,
            }
        )
        self.assigned = False
        self.events: list[dict[str, Any]] = []
        self.watermarks: dict[tuple[str, int], int] = {}
        # every Watermark record read: (topic, partition, lsn, ts_ms)
        self.watermark_records: list[tuple[str, int, int, int]] = []

    def _assign(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            meta = self.consumer.list_topics(timeout=5)
            if all(t in meta.topics and meta.topics[t].partitions for t in self.topics):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"topics {self.topics} did not appear")
            time.sleep(0.2)
        parts = [TopicPartition(t, p, 0) for t in self.topics for p in meta.topics[t].partitions]
        self.consumer.assign(parts)
        for tp in parts:
            self.watermarks[(tp.topic, tp.partition)] = 0
        self.assigned = True

    def poll(self, seconds: float) -> None:
        if not self.assigned:
            self._assign(60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(5000, 0.2):
                if msg.error():
                    continue
                value = orjson.loads(msg.value())
                if value.get("event_type") == "Watermark":
                    key = (msg.topic(), msg.partition())
                    self.watermarks[key] = max(self.watermarks.get(key, 0), parse_lsn(value["lsn"]))
                    self.watermark_records.append((*key, parse_lsn(value["lsn"]), value["ts_ms"]))
                else:
                    self.events.append(value)

    def watermark(self) -> int:
        return min(self.watermarks.values()) if self.watermarks else 0

    def wait_for_watermark(self, lsn: int, timeout: float = 60, proc: CdcProcess | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.watermark() < lsn:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"watermark {self.watermark():X} did not reach {lsn:X} within {timeout} s"
                    + (f"\ncdc log:\n{proc.log()[-3000:]}" if proc else "")
                )
            if proc is not None and not proc.alive():
                raise AssertionError(f"cdc exited ({proc.proc.returncode if proc.proc else None}):\n{proc.log()[-3000:]}")
            self.poll(0.5)
        self.poll(0.5)

    def close(self) -> None:
        self.consumer.close()

    def changes(self) -> Iterator[dict[str, Any]]:
        for event in self.events:
            yield from event["changes"]


def current_lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return parse_lsn(row[0])


def rebuild_tables(changes: Iterator[dict[str, Any]], keys: dict[str, tuple[str, ...]]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Replay change envelopes in commit order into {table: {key: row}}.

    Redelivered duplicates are harmless (each change sets state); snapshot reads
    sit at the snapshot LSN, before every streamed change committed after it."""
    ordered = sorted(
        changes,
        key=lambda c: (parse_lsn(c["source"]["commit_lsn"]), 0 if c["op"] == "r" else 1, c["source"]["seq"]),
    )
    tables: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for c in ordered:
        table = c["source"]["table"]
        rows = tables.setdefault(table, {})
        if c["op"] == "t":
            rows.clear()
            continue
        image = c["after"] if c["op"] != "d" else c["before"]
        key = tuple(image[k] for k in keys[table])
        if c["op"] == "d":
            rows.pop(key, None)
            continue
        row = dict(c["after"])
        for name in c.get("unavailable") or ():
            row[name] = rows[key][name]  # unchanged TOAST: the previous value stands
        if c["op"] == "u" and c["before"] is not None:
            old_key = tuple(c["before"][k] for k in keys[table])
            if old_key != key:
                rows.pop(old_key, None)
        rows[key] = row
    return tables


def read_tables(dsn: str, names: list[str]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Postgres' own rows, converted exactly as the capture converts them."""
    from cdc.config import Settings
    from cdc.slot import table_infos

    settings = Settings(pg_dsn=dsn)
    out: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    with psycopg.connect(settings.query_dsn(), autocommit=True) as meta, psycopg.connect(settings.query_dsn()) as conn:
        infos: list[TableInfo] = table_infos(meta, "public", tuple(names))
        reader = SnapshotReader(conn, None, 0, 0, 50_000)
        for info in infos:
            rows: dict[tuple[Any, ...], dict[str, Any]] = {}
            for chunk in reader.chunks(info):
                for change in chunk:
                    assert change.after is not None
                    rows[tuple(change.after[k] for k in info.key)] = change.after
            out[info.name] = rows
        reader.close()
    return out
