"""``python -m writer``: migrate the write model, seed it, or put load on it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from writer.db import default_dsn
from writer.errors import WriterError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The shop's write model: schema migrations, bulk seeding, a load generator.",
)

DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn", help="Postgres DSN (default: $PG_DSN, else the local stack's shop database)"
    ),
]


@app.callback()
def _root() -> None:
    """The shop's write model: schema migrations, bulk seeding, a load generator."""


def _fail(exc: WriterError) -> None:
    typer.echo(f"writer: error: {exc}", err=True)
    raise typer.Exit(1)


@app.command()
def migrate(dsn: DsnOption = None) -> None:
    """Apply the SQL files in sql/postgres that this database has not seen yet."""
    from writer.db import describe_target
    from writer.migrate import migrate as run_migrations

    target = dsn or default_dsn()
    try:
        report = run_migrations(target)
    except WriterError as exc:
        _fail(exc)
        return
    where = describe_target(target)
    if report.applied:
        typer.echo(f"migrate: {where}: applied {', '.join(report.applied)}")
    else:
        typer.echo(f"migrate: {where}: up to date ({len(report.already_applied)} applied)")


@app.command()
def seed(
    customers: Annotated[int, typer.Option(help="customers to add")] = 0,
    products: Annotated[int, typer.Option(help="products to add")] = 0,
    orders: Annotated[int, typer.Option(help="orders to add, with items and payments")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="random seed of the generated data")] = 0,
    dsn: DsnOption = None,
) -> None:
    """Bulk-load customers, products and orders with COPY (appends to what is there)."""
    from writer.seed import SeedReport
    from writer.seed import seed as run_seed

    def progress(report: SeedReport) -> None:
        typer.echo(
            f"seed: {report.total_rows:,} rows in {report.seconds:.1f} s"
            f" ({report.rows_per_second:,.0f} rows/s)",
            err=True,
        )

    try:
        report = run_seed(
            dsn or default_dsn(),
            customers=customers,
            products=products,
            orders=orders,
            seed=seed,
            progress=progress,
        )
    except WriterError as exc:
        _fail(exc)
        return
    rows = ", ".join(f"{n:,} {table}" for table, n in report.rows.items())
    typer.echo(
        f"seed: {rows}: {report.total_rows:,} rows in {report.seconds:.1f} s"
        f" = {report.rows_per_second:,.0f} rows/s"
    )


@app.command()
def load(
    rate: Annotated[
        float, typer.Option(help="commands per second over all workers; 0 = as fast as possible")
    ] = 0.0,
    duration: Annotated[
        float | None,
        typer.Option(
            help="seconds to run; 0 = until Ctrl-C (default: 10, no limit with --commands)"
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="workers (and pooled connections)")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="seed of the command plan")] = 1,
    commands: Annotated[
        int, typer.Option(help="stop after exactly this many commands; 0 = no limit")
    ] = 0,
    live: Annotated[
        bool, typer.Option("--live", help="live display of rate, latency, errors")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    dsn: DsnOption = None,
) -> None:
    """Run the shop's command mix against the database and report rate and latency."""
    import asyncio

    import orjson
    from rich.console import Console

    from writer.display import LiveView, print_summary
    from writer.load import LoadConfig, ensure_catalogue, run_load, summary

    if duration is None:
        duration = 0.0 if commands else 10.0
    if rate < 0 or duration < 0 or commands < 0 or concurrency < 1:
        _fail(WriterError("--rate, --duration and --commands must be >= 0, --concurrency >= 1"))
    config = LoadConfig(
        rate=rate, duration=duration, concurrency=concurrency, seed=seed, commands=commands
    )
    target = dsn or default_dsn()
    console = Console(stderr=True)

    async def main() -> dict[str, object]:
        added = await ensure_catalogue(target, seed)
        if any(added):
            typer.echo(f"load: bootstrapped {added[0]} customers and {added[1]} products", err=True)
        if live:
            with LiveView(config, console) as view:
                stats, elapsed = await run_load(target, config, tick=view)
        else:
            stats, elapsed = await run_load(target, config)
        return summary(stats, elapsed, config)

    try:
        result = asyncio.run(main())
    except WriterError as exc:
        _fail(exc)
        return
    except asyncio.CancelledError:
        typer.echo("writer load: interrupted twice; stopped without a summary", err=True)
        raise typer.Exit(130) from None
    if json_output:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_summary(result, Console(soft_wrap=True))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
