"""Fixtures shared by the projections tests: keep this to generic ones.

Redis: the local stack's server (REDIS_URL); every test works under a unique
key namespace and deletes it afterwards, so tests (and engineers) never
collide and db 0 is never flushed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:56379/0")


async def delete_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key under ``{namespace}:`` (SCAN, never FLUSHDB)."""
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.Redis]:
    """A redis.asyncio client (bytes replies) on the local Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except redis.ConnectionError as e:
        await client.aclose()
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({e}); run `make up` first")
    yield client
    await client.aclose()


@pytest.fixture
async def redis_namespace(redis_client: redis.Redis) -> AsyncIterator[str]:
    """A key namespace of this test's own ("test:<uuid>"), deleted at teardown."""
    namespace = f"test:{uuid.uuid4().hex}"
    yield namespace
    await delete_namespace(redis_client, namespace)


# ---- ClickHouse (embedded chdb) ---------------------------------------------------
# chdb opens one data directory per process (and holds a lock on it), so the
# whole test run shares one, in a temp directory; every test works in a
# database of its own (clickhouse_database) and drops it afterwards.


@pytest.fixture(scope="session")
def chdb_backend(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The embedded ClickHouse of this test process (projections.clickhouse_backend.ChdbBackend)."""
    from projections.clickhouse_backend import open_backend

    backend = open_backend(f"chdb://{tmp_path_factory.mktemp('chdb')}")
    yield backend
    backend.close()


@pytest.fixture
def clickhouse_database(chdb_backend):  # type: ignore[no-untyped-def]
    """A ClickHouse database name of this test's own ("t_<uuid>"), dropped at teardown."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    chdb_backend.command(f"DROP DATABASE IF EXISTS {name} SYNC")


# ---- app worker: a synthetic shop history, Kafka topics, a worker subprocess ---------
# (fixtures of tests/projections/test_app*.py, test_api*.py, test_dlq*.py, test_e2e*.py)

KAFKA_BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092")


class ShopHistory:
    """Row changes of shop commands, mapped to domain events by cdc's own TransactionMapper.

    The events are exactly what cdc publishes for those row changes (v1 payloads
    included), without needing Postgres: for tests of the consumer side.
    """

    def __init__(self, start_lsn: int = 0x1_0000_0000) -> None:
        from cdc.mapping import TransactionMapper

        self.mapper = TransactionMapper()
        self.lsn = start_lsn
        self.ts_ms = 1_764_000_000_000
        self.orders: dict[int, dict] = {}
        self.customers: dict[int, dict] = {}

    def _tx(self, rows: list[tuple[str, str, dict | None, dict | None]]) -> list:
        from cdc.changes import RowChange

        self.lsn += 0x1000
        self.ts_ms += 1000
        commit = self.lsn + 0x800
        self.mapper.begin(commit, self.ts_ms, self.lsn)
        events: list = []
        keys = {"customers": ("id",), "orders": ("id",), "order_items": ("order_id", "line_no"),
                "payments": ("id",), "products": ("id",)}  # fmt: skip
        for seq, (table, op, before, after) in enumerate(rows):
            events += self.mapper.add(RowChange(
                op=op, schema="public", table=table, key=keys[table], before=before, after=after,
                unavailable=(), unconverted=(), lsn=self.lsn + seq * 8, commit_lsn=commit,
                txid=self.lsn, seq=seq, commit_ts_ms=self.ts_ms, snapshot=None,
            ))  # fmt: skip
        events += self.mapper.end()
        return events

    def _ts(self) -> str:
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self.ts_ms / 1000 + 1, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def register(self, cid: int, email: str | None = None) -> list:
        row = {"id": cid, "email": email or f"c{cid}@example.com", "full_name": f"Customer {cid}",
               "phone": None, "profile": {"tier": "basic"}, "bio": "", "created_at": self._ts(),
               "updated_at": self._ts()}  # fmt: skip
        self.customers[cid] = row
        return self._tx([("customers", "c", None, row)])

    def place(self, oid: int, cid: int, lines: int = 2, price: str = "10.00") -> list:
        ts = self._ts()
        cents = int(price.replace(".", ""))
        total = f"{cents * lines // 100}.{cents * lines % 100:02d}"
        order = {"id": oid, "customer_id": cid, "status": "pending", "currency": "EUR",
                 "subtotal": total, "tax": "0.00", "shipping_fee": "0.00", "total": total,
                 "shipping_address": {"country": "FR"}, "placed_at": ts, "paid_at": None,
                 "shipped_at": None, "cancelled_at": None, "refunded_at": None, "updated_at": ts}  # fmt: skip
        self.orders[oid] = order
        rows = [("orders", "c", None, dict(order))]
        for line in range(1, lines + 1):
            rows.append(("order_items", "c", None, {"order_id": oid, "line_no": line, "product_id": line,
                         "quantity": 1, "unit_price": price, "line_total": price}))  # fmt: skip
        return self._tx(rows)

    def pay(self, oid: int, payment_id: int, amount: str | None = None) -> list:
        ts = self._ts()
        order = self.orders[oid]
        order.update(status="paid", paid_at=ts, updated_at=ts)
        payment = {"id": payment_id, "order_id": oid, "kind": "capture",
                   "amount": amount or order["total"], "method": "card",
                   "provider_ref": "7f1c2a4e-0000-4000-8000-000000000000", "created_at": ts}  # fmt: skip
        return self._tx([("orders", "u", None, dict(order)), ("payments", "c", None, payment)])

    def ship(self, oid: int) -> list:
        ts = self._ts()
        order = self.orders[oid]
        order.update(status="shipped", shipped_at=ts, updated_at=ts)
        return self._tx([("orders", "u", None, dict(order))])


@pytest.fixture
def shop_history() -> ShopHistory:
    return ShopHistory()


class EventTopics:
    """Topics of this test's own (``<prefix>.<aggregate>.events``, 6 partitions), deleted afterwards."""

    def __init__(self, prefix: str) -> None:
        from confluent_kafka import Producer

        self.prefix = prefix
        self.names = [f"{prefix}.{agg}.events" for agg in ("order", "customer", "product")]
        self.producer = Producer({"bootstrap.servers": KAFKA_BOOTSTRAP, "enable.idempotence": True,
                                  "linger.ms": 5, "compression.type": "lz4",
                                  "queue.buffering.max.messages": 1_000_000})  # fmt: skip

    def publish(self, events: list, watermark: int | None = None, flush: bool = True) -> None:
        """Events keyed by aggregate id (as cdc does), then a Watermark on every partition."""
        from cdc.events import encode_event, encode_watermark

        produce = self.producer.produce
        for event in events:
            key, value = encode_event(event)
            self.produce_raw(f"{self.prefix}.{event.aggregate_type}.events", key, value)
        if watermark is not None:
            value = encode_watermark(watermark, 1_764_000_000_000)
            for name in self.names:
                for p in range(6):
                    produce(name, value, None, partition=p)
        if flush:
            self.producer.flush(30)

    def produce_raw(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key)
                return
            except BufferError:
                self.producer.poll(0.05)


@pytest.fixture
def event_topics() -> Iterator[EventTopics]:
    from confluent_kafka.admin import AdminClient, NewTopic

    prefix = f"t{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
    topics = EventTopics(prefix)
    futures = admin.create_topics([NewTopic(n, 6, 1) for n in topics.names], operation_timeout=30)
    for future in futures.values():
        future.result(timeout=30)
    yield topics
    existing = set(admin.list_topics(timeout=10).topics)
    doomed = [n for n in existing if n.startswith(prefix + ".")]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            try:
                future.result(timeout=30)
            except Exception:  # best effort cleanup
                pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """``python -m projections worker`` as a subprocess with its own app id, namespace, chdb dir and port."""

    def __init__(self, tmp: Path, prefix: str, namespace: str, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"worker-{self.port}.log"
        self.env = {
            **os.environ,
            "TOPIC_PREFIX": prefix,
            "REDIS_NAMESPACE": namespace,
            "PROJECTIONS_APP_ID": f"{prefix}-projections",
            "CLICKHOUSE_URL": f"chdb://{tmp / 'chdb'}",
            "PROJECTIONS_DATA_DIR": str(tmp / "data"),
            "QUERY_API": f"127.0.0.1:{self.port}",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = 60.0) -> None:
        import time
        import urllib.request

        root = Path(__file__).resolve().parents[2]
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "projections", "worker", "--log-level", "warning"],
            cwd=root, env=self.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.kill9()  # never leave it running (and its Redis process) after a failed start
        raise AssertionError(f"worker not healthy within {wait} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str, token: str | None = None) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a GET on the worker's API."""
        import urllib.error
        import urllib.request

        import orjson

        req = urllib.request.Request(f"{self.url}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=40) as resp:
                return resp.status, orjson.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"{}"), dict(exc.headers)

    def get_text(self, path: str) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}{path}", timeout=40) as resp:
            return str(resp.read().decode())

    def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        import orjson

        req = urllib.request.Request(f"{self.url}{path}", data=orjson.dumps(body), method="POST")
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=40) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"{}")

    def children(self) -> list[int]:
        """The worker's child processes (its Redis pipeline process)."""
        assert self.proc is not None
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids

    def kill9(self, *, worker_only: bool = False) -> None:
        """SIGKILL the worker and its Redis process (a crash of the machine or container);
        worker_only: the worker alone (its Redis process then ends on its own)."""
        assert self.proc is not None
        if not worker_only:
            for pid in self.children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def worker_factory(tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    """make(prefix, namespace, **env) -> a WorkerProcess (not started); all are stopped at teardown."""
    made: list[WorkerProcess] = []

    def make(prefix: str, namespace: str, **env: str) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, prefix, namespace, env)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop()
