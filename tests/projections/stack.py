"""The stack of an end-to-end test: a database, slot, publication, topic prefix, Redis
namespace and chdb directory of its own, with cdc and a worker on them; close() removes
all of it (tests/projections/test_e2e.py, test_rebuild.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import redis

from projections.config import Settings
from projections.verify import verify

from .conftest import KAFKA_BOOTSTRAP, REDIS_URL, WorkerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")


class Stack:
    def __init__(self, tmp: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.db = f"projections_e2e_{tag}"
        self.dsn = psycopg.conninfo.make_conninfo(ADMIN_DSN, dbname=self.db)
        self.prefix = f"e2e{tag}"
        self.namespace = f"test:e2e:{tag}"
        self.tmp = tmp
        self.cdc: subprocess.Popen[bytes] | None = None
        self.worker = WorkerProcess(tmp, self.prefix, self.namespace, {"PG_DSN": self.dsn})
        self.cdc_env = {
            **os.environ,
            "PG_DSN": self.dsn,
            "CDC_SLOT": f"e2e_{tag}",
            "CDC_PUBLICATION": f"e2e_{tag}",
            "CDC_TOPIC_PREFIX": self.prefix,
            "CDC_METRICS_PORT": str(free_port()),
            "CDC_SPOOL_DIR": str(tmp / "spool"),
        }

    def settings(self) -> Settings:
        return Settings.from_env({
            "PG_DSN": self.dsn, "REDIS_URL": REDIS_URL, "REDIS_NAMESPACE": self.namespace,
            "QUERY_API": f"127.0.0.1:{self.worker.port}", "TOPIC_PREFIX": self.prefix,
            "CLICKHOUSE_URL": self.worker.env["CLICKHOUSE_URL"], "KAFKA_BOOTSTRAP": KAFKA_BOOTSTRAP,
        })  # fmt: skip

    def start_cdc(self) -> None:
        log = (self.tmp / "cdc.log").open("ab")
        self.cdc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "run", "--log-level", "warning"],
            cwd=ROOT, env=self.cdc_env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def writer(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "writer", *args, "--dsn", self.dsn],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def verify(self, timeout_s: float = 60.0) -> None:
        report = asyncio.run(verify(self.settings(), timeout_s))
        problems = [d for c in report.checks for d in c.differences[:5]]
        assert report.ok, f"verifier found differences: {problems}"
        assert sum(c.checked for c in report.checks) > 0

    def open(self, *seed: str) -> None:
        """Create the database, migrate it, seed it (`writer seed` arguments, if any), start cdc and the worker."""
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.writer("migrate")
        if seed:
            self.writer("seed", *seed)
        self.start_cdc()
        self.worker.start()

    def close(self) -> None:
        """Stop the worker and cdc; drop the slot, publication, database, Redis keys (every
        generation too), topics and the worker's consumer groups, waiting for Kafka's answers
        (a request still queued when the admin client goes away is never sent)."""
        self.worker.stop()
        if self.cdc is not None and self.cdc.poll() is None:
            self.cdc.send_signal(signal.SIGTERM)
            try:
                self.cdc.wait(20)
            except subprocess.TimeoutExpired:
                self.cdc.kill()
        subprocess.run([sys.executable, "-m", "cdc", "reset", "--yes"], cwd=ROOT, env=self.cdc_env,
                       capture_output=True, timeout=60)  # fmt: skip
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        # the base namespace, every generation (<ns>.g<N>:) and the pointer (<ns>@generation)
        delete_keys(redis.Redis.from_url(REDIS_URL), f"{self.namespace}[:.@]*")
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
        doomed = [
            n for n in admin.list_topics(timeout=10).topics if n.startswith(self.prefix + ".")
        ]
        app_id = self.worker.env["PROJECTIONS_APP_ID"]
        groups = [g.group_id for g in admin.list_consumer_groups().result(30).valid
                  if g.group_id.startswith(app_id + ".")]  # fmt: skip
        futures = list(
            (admin.delete_topics(doomed, operation_timeout=30) if doomed else {}).values()
        )
        futures += (
            admin.delete_consumer_groups(groups, request_timeout=30) if groups else {}
        ).values()
        for future in futures:
            try:
                future.result(60)
            except Exception:  # best effort
                pass


def delete_keys(client: redis.Redis, pattern: str) -> None:
    batch = list(client.scan_iter(match=pattern, count=1000))
    for i in range(0, len(batch), 1000):
        client.delete(*batch[i : i + 1000])
