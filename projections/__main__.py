"""``python -m projections worker | verify``."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from projections.config import ConfigError, Settings, mask_url

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
) -> None:
    """Run the projection worker and the query API (Ctrl-C / SIGTERM stop it cleanly).

    Embedded ClickHouse (chdb, the default) allows one worker per data
    directory; with CLICKHOUSE_URL naming a server, start several: they share
    the partitions (one Kafka consumer group per projection).
    """
    import faust

    from projections.app import build_app, build_runtime

    settings = _settings()
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        runtime = build_runtime(settings)
    except Exception as exc:
        typer.echo(f"projections: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    faust_app = build_app(settings, runtime)
    import gc

    # Batches allocate ~30 objects per event and free them by reference counting (no
    # cycles); the cyclic collector's full passes over that were seconds-long pauses.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    logging.getLogger("projections").info(
        "worker %s: Kafka %s, topics %s, Redis %s (namespace %s), ClickHouse %s, query API http://%s:%d",
        settings.app_id, settings.kafka_bootstrap, ", ".join(settings.topics),
        mask_url(settings.redis_url), settings.redis_namespace, mask_url(settings.clickhouse_url),
        settings.api_host, settings.api_port,
    )  # fmt: skip
    level = {"warning": "warn", "critical": "crit"}.get(log_level.lower(), log_level.lower())
    worker = faust.Worker(faust_app, loglevel=level, quiet=True, redirect_stdouts=False)
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


if __name__ == "__main__":
    app()
