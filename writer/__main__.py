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
    typer.Option("--dsn", help="Postgres DSN [default: $PG_DSN or the local stack's shop]"),
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
