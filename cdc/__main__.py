"""``python -m cdc run | status | reset``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.table import Table

from cdc.capture import Capture, FatalCaptureError
from cdc.config import ConfigError, Settings, mask_dsn
from cdc.logs import setup_logging
from cdc.lsn import format_lsn
from cdc.metrics import CaptureMetrics
from cdc.signals import ensure_signal_table, send_snapshot_signal
from cdc.slot import drop_slot_and_publication, published_tables, read_slot
from cdc.snapshot_state import SnapshotState

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, help="Capture: Postgres logical replication -> domain events -> Kafka.")
err = Console(stderr=True)
log = logging.getLogger("cdc")


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ConfigError as exc:
        err.print(f"[red]cdc: bad configuration:[/] {exc}")
        raise typer.Exit(2) from None


def _connect_or_exit(settings: Settings) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(settings.query_dsn(), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        err.print(f"[red]cdc: cannot connect to Postgres at {mask_dsn(settings.pg_dsn)}:[/] {' '.join(str(exc).split())}")
        err.print("is the stack up? (make up)")
        raise typer.Exit(1) from None


@app.command()
def run(
    snapshot_mode: Annotated[str | None, typer.Option("--snapshot-mode", help="initial (default) | never | initial_only")] = None,
    tables: Annotated[str | None, typer.Option(help="comma-separated tables to publish (default: every table of the schema)")] = None,
    slot: Annotated[str | None, typer.Option(help="replication slot name (CDC_SLOT, default readside)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics port (CDC_METRICS_PORT, default 9187; 0 = off)")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="structured JSON logs")] = False,
) -> None:
    """Capture changes until stopped (Ctrl-C / SIGTERM stop it cleanly)."""
    overrides: dict[str, Any] = {"snapshot_mode": snapshot_mode, "slot": slot, "metrics_port": metrics_port}
    if tables is not None:
        overrides["tables"] = tuple(t.strip() for t in tables.split(",") if t.strip())
    settings = _settings(**overrides)
    setup_logging(log_level, json_logs)
    metrics = CaptureMetrics(settings.slot)
    try:
        metrics.serve(settings.metrics_port, os.environ.get("CDC_METRICS_ADDR", "127.0.0.1"))
    except OSError as exc:
        err.print(f"[red]cdc: cannot serve metrics on 127.0.0.1:{settings.metrics_port}:[/] {exc} (set CDC_METRICS_PORT)")
        raise typer.Exit(1) from None
    capture = Capture(settings, metrics)
    log.info("capture starting: %s, slot %s, publication %s", _target(settings), settings.slot, settings.publication)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, capture.stop)
        await capture.run()

    try:
        asyncio.run(main())
    except FatalCaptureError as exc:
        err.print(f"[red]cdc: {exc}[/]")
        raise typer.Exit(1) from None
    if capture.publisher is not None:
        left = capture.publisher.flush(10)
        if left:
            log.warning("%d messages were not acknowledged before exit; they will be sent again on restart", left)
    log.info("capture stopped")


def _target(settings: Settings) -> str:
    return f"Postgres {mask_dsn(settings.pg_dsn)}, Kafka {settings.kafka_bootstrap}"


@app.command()
def status(
    slot: Annotated[str | None, typer.Option(help="replication slot name")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Slot, confirmed LSN, lag in bytes and seconds, events/s, topics."""
    settings = _settings(slot=slot)
    with _connect_or_exit(settings) as conn:
        state = read_slot(conn, settings.slot)
        repl = conn.execute(
            """select extract(epoch from flush_lag)::float8, extract(epoch from now() - reply_time)::float8
                 from pg_stat_replication where application_name = %s""",
            (f"readside-cdc-{settings.slot}",),
        ).fetchone()
        tables = published_tables(conn, settings)
        snap = SnapshotState(conn, settings.slot)
        snapshot_complete = snap.complete()
    rate = _events_per_second(settings)
    topics = _topics(settings)
    out: dict[str, Any] = {
        "slot": settings.slot,
        "exists": state is not None,
        "active": bool(state and state.active),
        "wal_status": state.wal_status if state else None,
        "confirmed_lsn": format_lsn(state.confirmed_flush) if state and state.confirmed_flush is not None else None,
        "current_lsn": format_lsn(state.current_lsn) if state else None,
        "lag_bytes": state.lag_bytes if state else None,
        "lag_seconds": repl[0] if repl and repl[0] is not None else (0.0 if repl else None),
        "events_per_s": rate,
        "snapshot_complete": snapshot_complete,
        "publication": settings.publication,
        "tables": [t.qualified for t in tables],
        "topics": topics,
    }
    if json_out:
        import orjson

        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console = Console()
        table = Table(show_header=False, box=None)
        for k, v in out.items():
            if k == "topics":
                v = ", ".join(f"{name} ({parts} partitions, {msgs} messages)" for name, parts, msgs in v) or "none"
            elif k == "tables":
                v = ", ".join(v) or "none"
            table.add_row(k, "-" if v is None else str(v))
        console.print(table)
        if state is None:
            console.print('no slot yet: "python -m cdc run" creates it (and takes the initial snapshot)')
        elif state.wal_status == "lost":
            console.print('[red]the slot was invalidated; run "python -m cdc reset --yes" then "python -m cdc run"[/]')
    if state is not None and state.wal_status == "lost":
        raise typer.Exit(1)


def _events_per_second(settings: Settings) -> float | None:
    """Rate from the running capture's metrics endpoint, sampled over one second."""
    import urllib.request

    def sample() -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=1) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("cdc_events_total{"):
                        return float(line.rsplit(" ", 1)[1])
        except OSError:
            return None
        return None

    if not settings.metrics_port:
        return None
    first = sample()
    if first is None:
        return None
    time.sleep(1.0)
    second = sample()
    return None if second is None else round(second - first, 1)


def _topics(settings: Settings) -> list[tuple[str, int, int]]:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    try:
        consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "readside-cdc-status"})
        meta = consumer.list_topics(timeout=5)
        out = []
        prefix = settings.topic_prefix + "."
        for name, topic in sorted(meta.topics.items()):
            if not name.startswith(prefix) or not name.endswith(".events"):
                continue
            total = 0
            for p in topic.partitions:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5)
                total += hi - lo
            out.append((name, len(topic.partitions), total))
        consumer.close()
        return out
    except KafkaException as exc:
        err.print(f"[yellow]cdc: Kafka at {settings.kafka_bootstrap} did not answer: {exc}[/]")
        return []


@app.command()
def snapshot(
    tables: Annotated[str | None, typer.Option(help="comma-separated tables to read again (default: every published table)")] = None,
    slot: Annotated[str | None, typer.Option(help="replication slot name")] = None,
    show: Annotated[bool, typer.Option("--status", help="list incremental snapshots and their progress instead")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="with --status: print JSON")] = False,
) -> None:
    """Ask the running capture for an incremental snapshot (DBLog chunks, the stream never pauses)."""
    settings = _settings(slot=slot)
    with _connect_or_exit(settings) as conn:
        ensure_signal_table(conn)
        if show:
            rows = conn.execute(
                """select request_id, array_to_string(tables, ','), table_index, chunks, rows, status,
                          coalesce(error, ''), created_at, finished_at
                     from readside_cdc.incremental_snapshots where slot = %s order by created_at""",
                (settings.slot,),
            ).fetchall()
            if json_out:
                import orjson

                keys = ("request", "tables", "done_tables", "chunks", "rows", "status", "error", "created_at", "finished_at")
                sys.stdout.write(orjson.dumps([dict(zip(keys, r, strict=True)) for r in rows], option=orjson.OPT_INDENT_2).decode() + "\n")
                return
            table = Table("request", "tables", "done tables", "chunks", "rows", "status", "error", "created", "finished")
            for r in rows:
                table.add_row(*(("" if v is None else str(v)) for v in r))
            Console().print(table)
            return
        names = [t.strip() for t in (tables or "").split(",") if t.strip()]
        published = {t.name for t in published_tables(conn, settings)} | {t.qualified for t in published_tables(conn, settings)}
        unknown = [t for t in names if t not in published]
        if unknown:
            err.print(f"[red]cdc: not in publication {settings.publication}:[/] {', '.join(unknown)}")
            raise typer.Exit(2)
        request = send_snapshot_signal(conn, settings.slot, names)
    print(f"incremental snapshot {request} requested for {', '.join(names) or 'every published table'}; "
          f'"python -m cdc snapshot --status" shows its progress')


@app.command()
def reset(
    yes: Annotated[bool, typer.Option("--yes", help="confirm: drop the slot and the publication")] = False,
    slot: Annotated[str | None, typer.Option(help="replication slot name")] = None,
) -> None:
    """Drop the slot and the publication, to start over with a fresh snapshot."""
    settings = _settings(slot=slot)
    if not yes:
        err.print(
            f'this drops slot "{settings.slot}" and publication "{settings.publication}"; the next '
            '"python -m cdc run" takes a new initial snapshot. Pass --yes to do it.'
        )
        raise typer.Exit(2)
    with _connect_or_exit(settings) as conn:
        try:
            done = drop_slot_and_publication(conn, settings)
        except Exception as exc:
            err.print(f"[red]cdc: reset failed:[/] {exc}")
            raise typer.Exit(1) from None
        SnapshotState(conn, settings.slot).forget()
    for line in done or ["nothing to drop"]:
        print(line)


if __name__ == "__main__":
    app()
