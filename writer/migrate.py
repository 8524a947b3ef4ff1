"""Apply sql/postgres/*.sql in name order, each once, each in its own transaction.

Applied files are recorded with a SHA-256 of their bytes in
``schema_migrations``; an applied file that changed (or vanished) stops the
migration, because the database would no longer match the files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from writer.db import unavailable
from writer.errors import MigrationError

__all__ = ["MIGRATIONS_DIR", "Migration", "MigrationReport", "load_migrations", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "postgres"

# Any constant shared by every migrator of this database: concurrent
# `migrate` runs queue up on it instead of racing to create the same tables.
_LOCK_KEY = 0x5752_4954_4552  # "WRITER"

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    filename   text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    filename: str
    checksum: str
    sql: str


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: list[str]
    already_applied: list[str]


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migration directory {directory} does not exist")
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        data = path.read_bytes()
        migrations.append(
            Migration(path.name, hashlib.sha256(data).hexdigest(), data.decode("utf-8"))
        )
    if not migrations:
        raise MigrationError(f"no *.sql files in {directory}")
    return migrations


def _check_ledger(
    migrations: list[Migration], applied: dict[str, tuple[str, Any]], directory: Path
) -> None:
    on_disk = {m.filename: m for m in migrations}
    for filename, (checksum, applied_at) in sorted(applied.items()):
        migration = on_disk.get(filename)
        if migration is None:
            raise MigrationError(
                f"{filename} was applied on {applied_at:%Y-%m-%d %H:%M} but is missing from "
                f"{directory}; restore it (applied migrations are never removed)"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"{directory / filename} changed after it was applied on "
                f"{applied_at:%Y-%m-%d %H:%M} (recorded sha256 {checksum[:12]}, "
                f"file now {migration.checksum[:12]}); restore the file and put the "
                f"change in a new migration file"
            )


def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> MigrationReport:
    """Bring the database at ``dsn`` up to date with ``directory``; safe to rerun."""
    migrations = load_migrations(directory)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(_CREATE_LEDGER)
            rows = conn.execute("SELECT filename, checksum, applied_at FROM schema_migrations")
            applied = {name: (checksum, at) for name, checksum, at in rows.fetchall()}
            _check_ledger(migrations, applied, directory)
            done: list[str] = []
            for migration in migrations:
                if migration.filename in applied:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (filename, checksum) VALUES (%s, %s)",
                            (migration.filename, migration.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"{directory / migration.filename} failed and was rolled back: "
                        f"{str(exc).strip()}"
                    ) from None
                done.append(migration.filename)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return MigrationReport(applied=done, already_applied=sorted(applied))
