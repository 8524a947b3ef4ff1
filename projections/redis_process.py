"""The Redis pipeline in a process of its own, and the worker's handle on it.

Both pipelines in one process shared one interpreter lock: a ClickHouse batch
(its decode, digest and encode, 20-30 us an event in Python) held up the Redis
pipeline's next batch, and measured that was most of the Redis views' tail
latency (p99 171 ms with the ClickHouse pipeline off, 550-1,170 ms with it on,
on the 2-core development machine). So the worker starts
``python -m projections.redis_process`` as a child: the same Pipeline and
Projector as before (consumer group ``<app id>.redis``, batches, positions
stored with the writes, dead letters), with a Redis client of its own. The
worker keeps the query API (its own Redis client reads the views), the
ClickHouse pipeline, rebuilds and snapshots.

The two talk over the child's stdin and stdout, one JSON object per line:

- child -> worker: ``{"progress": ...}`` after every applied batch and every
  seek (Progress.snapshot(): positions, watermarks, counts; what /status,
  min_lsn waits and the lag metrics read), ``{"metrics": "<text>"}`` every
  second (the child's Prometheus samples, served by the worker's /metrics),
  ``{"up": true}`` once its consumer runs, ``{"re": id}`` answering a command;
- worker -> child: ``{"op": "pause" | "resume" | "reseek", "id": n}``. A pause
  is answered once the batch in flight is applied, and holds the pipeline
  until the resume: rebuilds and snapshot restores change the store in
  between. ``reseek`` follows the generation pointer (a rebuild's switch)
  and seeks to the store's positions.

The child ends when its stdin closes: when the worker stops, and also when
the worker is killed (kill -9 closes the pipe), so it never outlives it; it
applies the batch in flight first, and a batch cut short is read again from
the stored positions anyway. If the child dies, the worker logs its exit and
starts another after a backoff (1 s, doubling up to 30 s); /health reports the
Redis pipeline down meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as redis
from mode import Service
from prometheus_client import disable_created_metrics

from projections.app import Pipeline, Progress, Projector, RedisAdapter
from projections.config import ConfigError, Settings
from projections.dlq import DeadLetterQueue
from projections.event_loop import use_event_loop
from projections.metrics import ProjectionMetrics

__all__ = ["RedisProcess", "RedisProcessError"]

log = logging.getLogger("projections")

_MAX_LINE = 64 * 1024 * 1024
_RESTART_MAX_S = 30.0
_STOP_WAIT_S = 20.0
# a command is not given up on (the child holds a pause until its batch in flight is
# applied, however long a Redis outage lasts); the wait is logged at this interval
_CALL_WARN_S = 30.0


class RedisProcessError(RuntimeError):
    """The Redis pipeline's process is not there to answer."""


# what the child must not see: it needs Kafka and Redis only
_NOT_FOR_THE_CHILD = ("API_TOKEN", "PG_DSN", "CLICKHOUSE_URL")


class RedisProcess(Service):
    """The worker's side: starts the child, mirrors its progress, sends it pause/resume/reseek."""

    def __init__(
        self, settings: Settings, *, log_level: str = "info", json_logs: bool = False, **kwargs: Any
    ) -> None:
        self.settings = settings
        self.log_level = log_level
        self.json_logs = json_logs
        self.progress = Progress("redis")
        self.metrics_text = b""
        self.proc: asyncio.subprocess.Process | None = None
        self.up = False
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        # one pause at a time, as with a pipeline in this process; and no new child is
        # started while one is held (it would start unpaused under a restore)
        self._pause_lock = asyncio.Lock()
        # counts of the children before this one: what /status shows adds up over restarts
        self._base = {"events": 0, "dead_letters": 0}
        super().__init__(**kwargs)

    @property
    def label(self) -> str:
        return "Pipeline[redis] (child process)"

    @property
    def running(self) -> bool:
        return not self.should_stop and self.up

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_THE_CHILD}
        return {
            **env,
            "KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "REDIS_URL": s.redis_url,
            "TOPIC_PREFIX": s.topic_prefix,
            "PROJECTIONS_APP_ID": s.app_id,
            "REDIS_NAMESPACE": s.redis_namespace,
            "PROJECTIONS_BATCH_MAX": str(s.batch_max),
            "PROJECTIONS_BATCH_WAIT_MS": str(s.batch_wait_ms),
        }

    async def _spawn(self) -> asyncio.subprocess.Process:
        args = [sys.executable, "-m", "projections.redis_process", "--log-level", self.log_level]
        if self.json_logs:
            args.append("--json-logs")
        # stderr is the worker's: the child's log lines go where the worker's go. A session
        # of its own: a Ctrl-C or a signal to the worker's process group reaches the
        # worker, which stops the child in order (closing its stdin)
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env(),
            limit=_MAX_LINE,
            start_new_session=True,
        )
        return self.proc

    async def on_start(self) -> None:
        await self._spawn()

    async def on_stop(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # the child applies the batch in flight and exits
        try:
            await asyncio.wait_for(proc.wait(), _STOP_WAIT_S)
        except TimeoutError:
            log.error("redis: the pipeline process did not stop within %.0f s; killing it", _STOP_WAIT_S)
            proc.kill()
            await proc.wait()

    @Service.task
    async def _supervise(self) -> None:
        """Read the child's reports; start another child if it dies."""
        delay = 1.0
        while not self.should_stop:
            proc = self.proc
            if proc is None:
                async with self._pause_lock:
                    proc = await self._spawn()
            assert proc.stdout is not None
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # longer than _MAX_LINE: not a report
                    proc.kill()
                    break
                if not line:
                    break
                try:
                    self._on_message(orjson.loads(line))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    # a line cut short by the child's death, or a bug: never the end of this task
                    log.error("redis: unreadable report from the pipeline process (%s): %r", exc, line[:200])
                    continue
                delay = 1.0
            code = await proc.wait()
            self.up = False
            self._base = {k: getattr(self.progress, k) for k in self._base}
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(
                        RedisProcessError(f"the Redis pipeline's process exited ({code})")
                    )
            self._waiting.clear()
            if self.should_stop:
                return
            log.error(
                "redis: the pipeline process exited with %s (its log is above); starting another in %.0f s",
                code, delay,
            )  # fmt: skip
            self.proc = None
            await self.sleep(delay)
            delay = min(delay * 2, _RESTART_MAX_S)

    def _on_message(self, msg: dict[str, Any]) -> None:
        if "progress" in msg:
            state = msg["progress"]
            for key, base in self._base.items():
                state[key] += base
            self.progress.load(state)
        if "metrics" in msg:
            self.metrics_text = msg["metrics"].encode()
        if "re" in msg:
            fut = self._waiting.pop(msg["re"], None)
            if fut is not None and not fut.done():
                if msg.get("error"):
                    fut.set_exception(RedisProcessError(msg["error"]))
                else:
                    fut.set_result(None)
        if msg.get("up"):
            self.up = True

    async def _call(self, op: str) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            raise RedisProcessError(
                "the Redis pipeline's process is not running (it is being restarted; see the "
                "worker's log); try again"
            )
        self._next_id += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = fut
        try:
            proc.stdin.write(orjson.dumps({"op": op, "id": self._next_id}) + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._waiting.pop(self._next_id, None)
            raise RedisProcessError(f"the Redis pipeline's process is gone ({exc})") from None
        started = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(fut), _CALL_WARN_S)
                return
            except TimeoutError:
                log.warning(
                    "redis: the pipeline process has not answered %r for %.0f s: its batch in "
                    "flight is still being applied (retried through a Redis outage? its log "
                    "says), or it is stuck (pid %s); still waiting",
                    op, time.monotonic() - started, proc.pid,
                )  # fmt: skip

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Once in, the child has applied its batch in flight and applies none until the exit.
        If the child dies meanwhile, no other starts before the exit, and the next call to
        it (a reseek) fails: a restore never goes on with a pipeline it did not pause."""
        async with self._pause_lock:
            await self._call("pause")
            try:
                yield
            finally:
                with contextlib.suppress(RedisProcessError):
                    await self._call("resume")  # a child that died is restarted unpaused

    async def reseek(self, *, clear: bool = False) -> None:
        await self._call("reseek-clear" if clear else "reseek")


# ---- the child: python -m projections.redis_process


async def _child(settings: Settings) -> int:
    # the worker serves these samples in its own families; a *_created series would be a
    # family of its own there, twice
    disable_created_metrics()  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    # fd 1 carries the reports, written without blocking this loop (a busy worker reads
    # late; the transport buffers meanwhile); anything a library prints goes to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    writer, _ = await loop.connect_write_pipe(asyncio.Protocol, out)
    client = redis.Redis.from_url(settings.redis_url)
    adapter = RedisAdapter(client, settings.redis_namespace)
    metrics = ProjectionMetrics()
    dlq = DeadLetterQueue(settings.kafka_bootstrap, client_id=f"{settings.app_id}-redis-dlq")
    projector = Projector(adapter, dlq, metrics)
    pipeline = Pipeline(
        projector,
        bootstrap=settings.kafka_bootstrap,
        group_id=f"{settings.app_id}.redis",
        topics=settings.redis_topics,
        batch_max=settings.batch_max,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    reports = _Reports(writer, projector.progress)
    projector.progress.listener = reports.changed
    stdin = asyncio.StreamReader(limit=_MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    # SIGTERM / SIGINT sent to the child itself: stop as on the worker's EOF
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stdin.feed_eof)

    async def run() -> None:
        await adapter.resolve()
        await pipeline.start()
        reports.send({"up": True})
        stopped = asyncio.ensure_future(pipeline.wait_until_stopped())
        try:
            while not stopped.done():
                reports.send({"metrics": metrics.render().decode()})
                await asyncio.wait([stopped], timeout=1.0)
        finally:
            stopped.cancel()
        raise RuntimeError(f"the pipeline stopped ({pipeline.crash_reason!r})")

    commands = _Commands(pipeline, adapter)
    runner = asyncio.ensure_future(run())
    code = 0
    try:
        # stdin is watched from the start: a worker gone while this one still waits
        # for its topics or for Redis must not leave it behind
        while True:
            lines = asyncio.ensure_future(stdin.readline())
            await asyncio.wait([lines, runner], return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                lines.cancel()
                exc = runner.exception()
                log.error("redis: the pipeline process ends: %s: %s", type(exc).__name__, exc)
                code = 1
                break
            line = lines.result()
            if not line:
                break  # the worker is stopping, or gone
            cmd = orjson.loads(line)
            error = None
            try:
                await commands.obey(cmd["op"])
            except Exception as exc:
                error = f"{cmd['op']} failed: {type(exc).__name__}: {exc}"
                log.error("redis: %s", error)
            reports.send({"re": cmd["id"], "error": error})
    finally:
        runner.cancel()
        commands.release()
        try:
            # bounded: a batch retrying through a Redis outage holds the pipeline; it
            # is not committed, so it is read again from the stored positions
            await asyncio.wait_for(pipeline.stop(), _STOP_WAIT_S / 2)
        except TimeoutError:
            log.error("redis: the pipeline did not stop within %.0f s; leaving", _STOP_WAIT_S / 2)
        await dlq.stop()
        await adapter.close()
        writer.close()
    return code


class _Reports:
    """The child's reports to the worker, in order. Progress is sent once per loop turn
    (a batch changes it twice: positions, then the offset lag), and always before any
    later message, so the worker sees a batch's positions before the reply to a pause."""

    def __init__(self, writer: asyncio.WriteTransport, progress: Progress) -> None:
        self.writer = writer
        self.progress = progress
        self.pending = False

    def changed(self, _progress: Progress) -> None:
        if not self.pending:
            self.pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if self.pending:
            self.pending = False
            self.writer.write(orjson.dumps({"progress": self.progress.snapshot()}) + b"\n")

    def send(self, msg: dict[str, Any]) -> None:
        self.flush()
        self.writer.write(orjson.dumps(msg) + b"\n")


class _Commands:
    """The worker's commands to the child's pipeline."""

    def __init__(self, pipeline: Pipeline, adapter: RedisAdapter) -> None:
        self.pipeline = pipeline
        self.adapter = adapter
        self.held = False  # paused: this holds the pipeline's batch lock

    async def obey(self, op: str) -> None:
        if op == "pause":
            if not self.held:
                await self.pipeline.batch_lock.acquire()
                self.held = True
        elif op == "resume":
            self.release()
        elif op in ("reseek", "reseek-clear"):
            await self.adapter.resolve()  # a rebuild's switch moved the generation pointer
            await self.pipeline.reseek(clear=op == "reseek-clear")
        else:
            raise ValueError(f"unknown command {op!r}")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.pipeline.batch_lock.release()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import gc

    from cdc.logs import setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m projections.redis_process",
        description="The Redis pipeline; started by `python -m projections worker`, not by hand.",
    )
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--json-logs", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.json_logs)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"projections (redis process): bad configuration: {exc}", file=sys.stderr)
        return 2
    # as in the worker: batches free their objects by reference counting; the cyclic
    # collector's full passes over them were long pauses
    gc.collect()
    gc.freeze()
    gc.set_threshold(300_000, 100, 1000)
    use_event_loop(settings.event_loop)
    return asyncio.run(_child(settings))


if __name__ == "__main__":
    sys.exit(main())
