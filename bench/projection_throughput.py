"""Benchmark: one projection worker draining a topic pre-filled with >= 1M events into Redis and ClickHouse.

    .venv/bin/python bench/projection_throughput.py [--events 1000000] [--prefix benchproj]
        [--only redis|clickhouse]

The topics ``<prefix>.{order,customer,product}.events`` (6 partitions) are
filled once with the writer's command mix as cdc would publish it
(bench/redis_apply.py's Workload: cdc's TransactionMapper over realistic row
changes) plus Watermark records, and kept for the next run (--refill to
rebuild them). Then ``python -m projections worker`` starts on them with a
fresh Redis namespace and chdb directory and the clock runs until each
projection's watermark reaches the last one published. Prints JSON: events/s
per projection (both run at once in the one worker, as deployed: ClickHouse in
the worker's process, Redis in its child process), the CPU seconds of each,
and those of the Redis server. ``--only`` runs a worker with that projection
alone (PROJECTIONS): what one projection can do when it has the machine's
cores to itself, against what both do sharing them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cdc.events import encode_event, encode_watermark  # noqa: E402
from cdc.lsn import format_lsn  # noqa: E402

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:59092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:56379/0")
AGGREGATES = ("order", "customer", "product")


def cpu_stall_us() -> int | None:
    """Linux PSI: µs during which some runnable task waited for a CPU (None without PSI).
    Its share of a run's wall time says how starved the machine was: runs of the same
    code on the 2-core development machine differ by 2-4x in p99 latency with it."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_pressure_pct(stall0: int | None, seconds: float) -> float | None:
    """Share of `seconds` (in %) some task waited for a CPU since cpu_stall_us() gave stall0."""
    stall1 = cpu_stall_us()
    if stall0 is None or stall1 is None or seconds <= 0:
        return None
    return round((stall1 - stall0) / (seconds * 1e6) * 100, 1)


def delete_topics(prefix: str, bootstrap: str = BOOTSTRAP) -> list[str]:
    """Delete every topic named <prefix>.* and wait for it (unwaited, the request may never
    leave the process); returns their names."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    doomed = [n for n in admin.list_topics(timeout=10).topics if n.startswith(prefix + ".")]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result(60)
    return doomed


def delete_groups(app_id: str, bootstrap: str = BOOTSTRAP) -> list[str]:
    """Delete a worker's consumer groups (<app id>.redis, .clickhouse, .rebuild, ...);
    returns their ids."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    groups = [g.group_id for g in admin.list_consumer_groups().result(30).valid
              if g.group_id.startswith(app_id + ".")]  # fmt: skip
    if groups:
        for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
            future.result(60)
    return groups


def topic_counts(prefix: str) -> tuple[int, int] | None:
    """(records, last watermark) already in the topics, or None when they do not exist."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"bench-{uuid.uuid4().hex}"})
    meta = consumer.list_topics(timeout=10)
    names = [f"{prefix}.{a}.events" for a in AGGREGATES]
    if any(n not in meta.topics for n in names):
        consumer.close()
        return None
    total = 0
    for name in names:
        for p in meta.topics[name].partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
            total += hi - lo
    # the last record of order partition 0 is the final Watermark
    tp = TopicPartition(names[0], 0)
    _, hi = consumer.get_watermark_offsets(tp, timeout=10)
    tp.offset = max(0, hi - 1)
    consumer.assign([tp])
    msg = consumer.poll(10)
    consumer.close()
    if msg is None or msg.error():
        return None
    doc = orjson.loads(msg.value())
    if doc.get("event_type") != "Watermark":
        return None
    from cdc.lsn import parse_lsn

    return total, parse_lsn(doc["lsn"])


def fill(prefix: str, n: int, partitions: int = 6) -> tuple[int, int]:
    """Create the topics and publish n events (plus watermarks); returns (records, final watermark)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from redis_apply import Workload

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    names = [f"{prefix}.{a}.events" for a in AGGREGATES]
    existing = [t for t in names if t in admin.list_topics(timeout=10).topics]
    if existing:
        for fut in admin.delete_topics(existing, operation_timeout=30).values():
            fut.result(30)
        time.sleep(2)
    config = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    for fut in admin.create_topics([NewTopic(t, partitions, 1, config=config) for t in names]).values():
        fut.result(30)
    producer = Producer({
        "bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "linger.ms": 20,
        "batch.size": 1_000_000, "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
    })  # fmt: skip

    def produce(topic: str, value: bytes, key: bytes | None, partition: int = -1) -> None:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                return
            except BufferError:
                producer.poll(0.05)

    workload = Workload(seed=7)
    records = 0
    lsn = 0
    started = time.monotonic()
    while records < n:
        chunk = workload.events(min(50_000, n - records)) if records == 0 else _more(workload, min(50_000, n - records))
        for event in chunk:
            key, value = encode_event(event)
            produce(f"{prefix}.{event.aggregate_type}.events", value, key)
        records += len(chunk)
        lsn = max(lsn, chunk[-1].commit_lsn)
        mark = encode_watermark(lsn, int(time.time() * 1000))
        for name in names:
            for p in range(partitions):
                produce(name, mark, None, p)
        records += len(names) * partitions
        producer.poll(0)
        print(f"fill: {records:,} records ({records / (time.monotonic() - started):,.0f}/s)", file=sys.stderr)
    producer.flush(120)
    return records, lsn


def _more(workload: Any, n: int) -> list[Any]:
    out: list[Any] = []
    rng = workload.rng
    while len(out) < n:
        r = rng.random()
        out += workload.register() if r < 0.04 else workload.place() if r < 0.40 else workload.move()
    return out


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """A projection worker subprocess of the benchmark's own (namespace, chdb dir, port, app id)."""

    def __init__(self, prefix: str, extra: dict[str, str] | None = None) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
        self.namespace = f"bench:{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.app_id = f"bench-{uuid.uuid4().hex[:8]}"
        # its own worker on loopback: no bearer token (one set for the dev worker would
        # make every /status read of the benchmark a 401)
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "API_TOKEN"}, "TOPIC_PREFIX": prefix, "REDIS_NAMESPACE": self.namespace,
            "PROJECTIONS_APP_ID": self.app_id,
            "CLICKHOUSE_URL": f"chdb://{self.tmp / 'chdb'}", "PROJECTIONS_DATA_DIR": str(self.tmp / "data"),
            "QUERY_API": f"127.0.0.1:{self.port}", **(extra or {}),
        }  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        log = (self.tmp / "worker.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "projections", "worker", "--log-level", "warning"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited: {(self.tmp / 'worker.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic()
            except OSError:
                time.sleep(0.1)
        raise SystemExit("worker did not become healthy")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/status", timeout=60) as resp:
            return orjson.loads(resp.read())  # type: ignore[no-any-return]

    def cpu_seconds(self) -> dict[str, float]:
        """user + system CPU time so far of the worker process and of its children (the
        Redis pipeline's process)."""
        assert self.proc is not None
        out = {"worker": _cpu(self.proc.pid), "redis_process": 0.0}
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            for pid in (task / "children").read_text().split():
                out["redis_process"] += _cpu(int(pid))
        return {k: round(v, 1) for k, v in out.items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        # the namespace, a rebuild's generations and its pointer key
        batch = list(client.scan_iter(match=f"{self.namespace}[:.@]*", count=5000))
        for i in range(0, len(batch), 5000):
            client.delete(*batch[i : i + 5000])
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:  # dev Kafka kept one pair of groups per run
            delete_groups(self.app_id)
        except Exception as exc:  # housekeeping: say so, do not fail the run
            print(f"could not delete the worker's consumer groups: {exc}", file=sys.stderr)


def machine_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every core together (/proc/stat):
    what every process used, and what there was."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz  # idle and iowait are not busy


def kafka_broker_pid() -> int | None:
    """The local stack's Kafka broker (a JVM running kafka.Kafka), if it runs here."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"kafka.Kafka" in cmdline.read_bytes().split(b"\0"):  # the JVM's main class
                return int(cmdline.parent.name)
        except OSError:
            continue
    return None


def redis_server_cpu_s() -> float:
    """CPU seconds the Redis server has used (INFO used_cpu_user + used_cpu_sys; its AOF
    rewrite children not included)."""
    import redis

    info = redis.Redis.from_url(REDIS_URL).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_rewrites() -> tuple[int, float]:
    """(AOF rewrites so far, CPU seconds of Redis's rewrite children so far): each rewrite
    forks Redis (~25 ms stopped, on this machine) and its child takes a core for seconds."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    cpu = client.info("cpu")
    return (
        int(client.info("persistence")["aof_rewrites"]),
        float(cpu["used_cpu_user_children"]) + float(cpu["used_cpu_sys_children"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--prefix", default="benchproj")
    parser.add_argument("--refill", action="store_true")
    parser.add_argument("--only", choices=("redis", "clickhouse"), help="run this projection alone")
    args = parser.parse_args()
    names = (args.only,) if args.only else ("redis", "clickhouse")

    found = None if args.refill else topic_counts(args.prefix)
    if found is None or found[0] < args.events:
        found = fill(args.prefix, args.events)
    records, final = found

    worker = Worker(args.prefix, {"PROJECTIONS": ",".join(names)})
    try:
        started = worker.start()
        stall0 = cpu_stall_us()
        redis_cpu0 = redis_server_cpu_s()
        rewrites0, children0 = redis_rewrites()
        kafka = kafka_broker_pid()
        kafka_cpu0 = _cpu(kafka) if kafka else 0.0
        busy0, all0 = machine_cpu_s()
        done: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        while len(done) < len(names) and time.monotonic() - started < 1800:
            status = worker.status()
            now = time.monotonic()
            for name, p in status["projections"].items():
                if name not in done and p["watermark"] == format_lsn(final):
                    done[name] = now - started
            samples.append({n: p["events_applied"] for n, p in status["projections"].items()})
            time.sleep(0.25)
        busy, all_ = machine_cpu_s()
        try:
            kafka_cpu: float | None = round(_cpu(kafka) - kafka_cpu0, 1) if kafka else None
        except OSError:  # the broker restarted meanwhile
            kafka_cpu = None
        status = worker.status()
        cpu = worker.cpu_seconds()
        redis_cpu = round(redis_server_cpu_s() - redis_cpu0, 1)
        rewrites, children = redis_rewrites()
        pressure = cpu_pressure_pct(stall0, time.monotonic() - started)
    finally:
        worker.stop()
    out = {
        "benchmark": "projection_throughput",
        "records_in_topics": records,
        "projections": {
            name: {
                "events_applied": status["projections"][name]["events_applied"],
                "seconds": round(done.get(name, float("nan")), 2),
                "events_per_s": round(status["projections"][name]["events_applied"] / done[name]) if name in done else None,
                "records_per_s": round(records / done[name]) if name in done else None,
            }
            for name in names
        },
        "target_events_per_s": 20_000,
        # contention-independent: events of the projections per CPU second of the worker
        # (its own process, ClickHouse's pipeline and chdb, and its Redis pipeline's)
        "worker_cpu_s": cpu,
        "events_per_worker_cpu_s": round(
            sum(status["projections"][n]["events_applied"] for n in names)
            / sum(cpu.values())
        ),
        # what applying the views costs Redis itself (the Lua script, the AOF), for the
        # per-event CPU budget: worker + Redis process + Redis server
        "redis_server_cpu_s": redis_cpu,
        # the dev stack's Redis keeps an append-only file (appendfsync everysec): the
        # rewrites the run set off, and their children's CPU (not in the figure above)
        "redis_aof_rewrites": rewrites - rewrites0,
        "redis_rewrite_children_cpu_s": round(children - children0, 1),
        "kafka_broker_cpu_s": kafka_cpu,  # the local stack's broker (null when not found here)
        # the whole machine from the worker's start to the last projection's end: every
        # process's CPU (the stack's, this benchmark's, anything else) against what the
        # cores had; near 100 % the machine, not a pipeline, sets the pace
        "machine_cpu_busy_s": round(busy - busy0, 1),
        "machine_cpu_s": round(all_ - all0, 1),
        "machine_cpu_busy_pct": round(100 * (busy - busy0) / max(all_ - all0, 1e-9), 1),
        "load_average_1m": os.getloadavg()[0],
        "cpu_pressure_pct": pressure,  # time some task waited for a CPU (Linux PSI)
    }
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
