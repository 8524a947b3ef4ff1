"""``python -m projections worker | verify``."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from projections.config import PROJECTIONS, ConfigError, Settings, mask_url

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Projections: Kafka event topics -> Redis user views and ClickHouse analytics, and the query API.",
)


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        typer.echo(f"projections: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def worker(
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="structured JSON logs")] = False,
) -> None:
    """Run the projection worker and the query API (Ctrl-C / SIGTERM stop it cleanly).

    Embedded ClickHouse (chdb, the default) allows one worker per data
    directory; with CLICKHOUSE_URL naming a server, start several: they share
    the partitions (one Kafka consumer group per projection). PROJECTIONS=redis
    or =clickhouse runs one projection only (a Redis-only worker never opens
    ClickHouse): the projections in workers of their own.
    """
    settings = _settings()
    from projections.event_loop import use_event_loop

    use_event_loop(settings.event_loop)  # before anything makes a loop
    import faust

    from cdc.logs import setup_logging
    from projections.app import build_app, build_runtime

    setup_logging(log_level, json_logs)
    try:
        runtime = build_runtime(settings, log_level=log_level, json_logs=json_logs)
    except Exception as exc:
        typer.echo(f"projections: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    faust_app = build_app(settings, runtime)
    import gc

    # Batches allocate ~30 objects per event and free them by reference counting (no
    # cycles); the cyclic collector's full passes over that were seconds-long pauses.
    gc.collect()
    gc.freeze()
    gc.set_threshold(300_000, 100, 1000)
    # The ClickHouse apply thread digests in Python; hand the GIL back to the event loop
    # (the API) more often than the default 5 ms.
    sys.setswitchinterval(0.001)
    stores = {
        "redis": f"Redis {mask_url(settings.redis_url)} (namespace {settings.redis_namespace})",
        "clickhouse": f"ClickHouse {mask_url(settings.clickhouse_url)}",
    }
    logging.getLogger("projections").info(
        "worker %s: projections %s; Kafka %s, topics %s, %s, query API http://%s:%d",
        settings.app_id, ",".join(settings.projections), settings.kafka_bootstrap,
        ", ".join(settings.topics), ", ".join(stores[p] for p in settings.projections),
        settings.api_host, settings.api_port,
    )  # fmt: skip
    level = {"warning": "warn", "critical": "crit"}.get(log_level.lower(), log_level.lower())
    from cdc.logs import json_logging_config

    worker = faust.Worker(
        faust_app, loglevel=level, quiet=True, redirect_stdouts=False,
        logging_config=json_logging_config(log_level) if json_logs else None,
    )  # fmt: skip
    # Faust's terminal spinner sets the root logger to DEBUG (at any --log-level of warning
    # or above) so that every debug call of aiokafka, faust and mode builds a record for
    # it: 10-15% of the worker's CPU. No spinner, no records below the chosen level.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    finally:
        import asyncio

        asyncio.run(runtime.close())


@app.command()
def verify(
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="seconds to wait for the projections to catch up")
    ] = 60.0,
    max_report: Annotated[int, typer.Option(help="differences printed per check")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Recompute every view and aggregate from Postgres and compare; exit 0 only when all match."""
    from projections.verify import run_verify

    settings = _settings()
    code = run_verify(settings, timeout_s=timeout_s, max_report=max_report, json_out=json_out)
    raise typer.Exit(code)


dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: list, show and replay them.")
app.add_typer(dlq_app, name="dlq")


def _dlq_topic(settings: Settings, topic: str) -> str:
    """Accept 'order', 'shop.order.events' or 'shop.order.events.dlq'."""
    if topic.endswith(".dlq"):
        return topic
    if topic.endswith(".events"):
        return f"{topic}.dlq"
    return f"{settings.topic_prefix}.{topic}.events.dlq"


@dlq_app.command("list")
def dlq_list(json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Dead-letter topics with how many letters each holds, by error."""
    from projections.dlq_admin import count_letters, dlq_topics

    settings = _settings()
    try:
        report: dict[str, dict[str, Any]] = {}
        for topic in dlq_topics(settings.kafka_bootstrap, settings.topic_prefix):
            total, errors = count_letters(settings.kafka_bootstrap, topic)
            report[topic] = {"letters": total, "errors": dict(errors.most_common(20))}
    except (ConnectionError, LookupError) as exc:
        typer.echo(f"projections: {exc}", err=True)
        raise typer.Exit(1) from None
    if json_out:
        import orjson

        typer.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    if not report:
        typer.echo("no dead letters")
    for topic, info in report.items():
        typer.echo(f"{topic}: {info['letters']} letters")
        for error, n in info["errors"].items():
            typer.echo(f"  {n:>6}  {error}")


@dlq_app.command("show")
def dlq_show(
    topic: Annotated[str, typer.Argument(help="order | shop.order.events | shop.order.events.dlq")],
    limit: Annotated[int, typer.Option(help="letters to show")] = 20,
) -> None:
    """The letters of one dead-letter topic: source position, stage, error, payload."""
    import orjson

    from projections.dlq_admin import read_letters

    settings = _settings()
    try:
        letters = read_letters(settings.kafka_bootstrap, _dlq_topic(settings, topic), limit)
    except (ConnectionError, LookupError) as exc:
        typer.echo(f"projections: {exc}", err=True)
        raise typer.Exit(1) from None
    for letter in letters:
        typer.echo(orjson.dumps(letter.describe()).decode())


@dlq_app.command("replay")
def dlq_replay(
    topic: Annotated[str, typer.Argument(help="order | shop.order.events | shop.order.events.dlq")],
) -> None:
    """Send the letters not replayed yet back to their source topic (after the fix is deployed)."""
    from projections.dlq_admin import replay

    settings = _settings()
    name = _dlq_topic(settings, topic)
    try:
        n = replay(settings.kafka_bootstrap, name, f"{settings.app_id}.dlq-replay")
    except (ConnectionError, LookupError) as exc:
        typer.echo(f"projections: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"replayed {n} letters from {name}")


snapshot_app = typer.Typer(no_args_is_help=True, help="Projection snapshots, taken and restored by the running worker.")
app.add_typer(snapshot_app, name="snapshot")


def _worker_call(settings: Settings, method: str, path: str, body: dict | None = None) -> dict:  # type: ignore[type-arg]
    import urllib.error
    import urllib.request

    import orjson

    url = f"http://{settings.api_host}:{settings.api_port}{path}"
    data = orjson.dumps(body) if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, method=method, data=data)
    req.add_header("Content-Type", "application/json")
    if settings.api_token:
        req.add_header("Authorization", f"Bearer {settings.api_token}")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return orjson.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        body = orjson.loads(exc.read() or b"{}")
        typer.echo(f"projections: {body.get('error', exc.reason)}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(
            f"projections: the worker does not answer at http://{settings.api_host}:{settings.api_port} ({exc}); "
            "snapshots are taken and restored by the running worker (python -m projections worker)",
            err=True,
        )
        raise typer.Exit(1) from None


@snapshot_app.command("create")
def snapshot_create() -> None:
    """Save both projections (Redis namespace, ClickHouse tables) with their positions and watermarks."""
    import orjson

    meta = _worker_call(_settings(), "POST", "/admin/snapshots")
    typer.echo(orjson.dumps(meta, option=orjson.OPT_INDENT_2).decode())


@snapshot_app.command("list")
def snapshot_list() -> None:
    """Snapshots with the watermark each projection had."""
    snaps = _worker_call(_settings(), "GET", "/admin/snapshots")["snapshots"]
    if not snaps:
        typer.echo("no projection snapshots")
    for s in snaps:
        typer.echo(
            f"{s['id']}  redis {s['redis']['watermark']} ({s['redis']['keys']} keys)  "
            f"clickhouse {s['clickhouse']['watermark']} ({sum(s['clickhouse']['rows'].values())} rows)"
        )


@snapshot_app.command("restore")
def snapshot_restore(snapshot_id: Annotated[str, typer.Argument(help="an id from 'snapshot list'")]) -> None:
    """Put a snapshot back; the worker consumes onward from the positions it holds."""
    import orjson

    result = _worker_call(_settings(), "POST", f"/admin/snapshots/{snapshot_id}/restore")
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@app.command()
def rebuild(
    name: Annotated[str, typer.Argument(help="redis | clickhouse | all")],
    source: Annotated[str, typer.Option(help="topics (replay from the start) | snapshot (bulk load of a consistent Postgres snapshot, then the topics from there)")] = "topics",
) -> None:
    """Build a new generation beside the live one, catch up, switch atomically, drop the old one."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    settings = _settings()
    if name not in (*PROJECTIONS, "all") or source not in ("topics", "snapshot"):
        typer.echo(f"projections: rebuild {'|'.join(PROJECTIONS)}|all [--source topics|snapshot]", err=True)
        raise typer.Exit(2)
    # "all": what the worker runs (PROJECTIONS)
    state = _worker_call(settings, "POST", "/admin/rebuild", {"projections": name if name == "all" else [name], "source": source})
    names = state["projections"]
    with Progress(
        TextColumn("rebuild {task.fields[names]}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[rate]:,.0f} records/s"), TextColumn("{task.fields[skipped]:,} skipped"),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    ) as bar:  # fmt: skip
        task = bar.add_task("rebuild", total=max(1, state["total"]), names=",".join(names), rate=0.0,
                            skipped=state.get("skipped", 0), status=state["status"])  # fmt: skip
        while state["status"] in ("running", "switching"):
            time.sleep(0.5)
            state = _worker_call(settings, "GET", "/admin/rebuild")
            bar.update(task, total=max(1, state["total"], state["done"]), completed=state["done"], rate=state["rate"],
                       skipped=state.get("skipped", 0), status=state["status"])  # fmt: skip
    for step in state["steps"]:
        typer.echo(step)
    skipped = state.get("skipped", 0)
    by_stage = ", ".join(f"{k} {v:,}" for k, v in sorted(state.get("skipped_by_stage", {}).items()))
    if state["status"] != "done":
        typer.echo(f"projections: rebuild {state['status']} after {state['done']:,} records ({skipped:,} skipped): "
                   f"{state['error']}; the live generation keeps serving", err=True)  # fmt: skip
        raise typer.Exit(1)
    typer.echo(f"rebuild done in {state['elapsed_s']} s ({state['done']:,} records, {skipped:,} skipped"
               f"{f': {by_stage}' if by_stage else ''})")  # fmt: skip


if __name__ == "__main__":
    app()
