"""Migrations apply once, in order, and refuse to run over a changed history."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg
import pytest

from writer.errors import MigrationError
from writer.migrate import MIGRATIONS_DIR, migrate

TABLES = ("customers", "products", "orders", "order_items", "payments")


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "postgres"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


def _one(dsn: str, query: str) -> tuple:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row


def test_migrating_twice_applies_each_file_once(fresh_database):
    dsn = fresh_database("migrate_twice")
    first = migrate(dsn)
    second = migrate(dsn)
    assert first.applied == [p.name for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert second.applied == []
    assert second.already_applied == first.applied
    assert _one(dsn, "SELECT count(*) FROM schema_migrations") == (len(first.applied),)


def test_a_changed_applied_file_is_refused(fresh_database, migrations):
    dsn = fresh_database("migrate_changed")
    migrate(dsn, migrations)
    schema = migrations / "0001_shop_schema.sql"
    schema.write_text(schema.read_text() + "\n-- an innocent comment\n")
    with pytest.raises(MigrationError, match=r"0001_shop_schema\.sql changed after it was applied"):
        migrate(dsn, migrations)


def test_a_removed_applied_file_is_refused(fresh_database, migrations):
    dsn = fresh_database("migrate_removed")
    (migrations / "0002_extra.sql").write_text("CREATE TABLE extra (id int);")
    migrate(dsn, migrations)
    (migrations / "0002_extra.sql").unlink()
    with pytest.raises(MigrationError, match=r"0002_extra\.sql was applied .* but is missing"):
        migrate(dsn, migrations)


def test_a_new_file_is_applied_after_the_old_ones(fresh_database, migrations):
    dsn = fresh_database("migrate_new")
    migrate(dsn, migrations)
    (migrations / "0002_gift_wrap.sql").write_text(
        "ALTER TABLE orders ADD COLUMN gift_wrap boolean NOT NULL DEFAULT false;"
    )
    assert migrate(dsn, migrations).applied == ["0002_gift_wrap.sql"]
    assert _one(dsn, "SELECT count(*) FROM orders WHERE gift_wrap") == (0,)


def test_a_failing_file_is_rolled_back_and_not_recorded(fresh_database, migrations):
    dsn = fresh_database("migrate_fail")
    (migrations / "0002_broken.sql").write_text("CREATE TABLE half_done (id int); SELECT nope;")
    with pytest.raises(MigrationError, match=r"0002_broken\.sql failed and was rolled back"):
        migrate(dsn, migrations)
    assert _one(dsn, "SELECT to_regclass('half_done') IS NULL") == (True,)
    assert _one(dsn, "SELECT count(*) FROM schema_migrations") == (1,)


def test_every_table_is_identified_by_its_primary_key_for_replication(dsn):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relname = ANY(%s) AND relkind = 'r'",
            (list(TABLES),),
        ).fetchall()
        publications = conn.execute("SELECT count(*) FROM pg_publication").fetchone()
    assert sorted(rows) == sorted((t, "d") for t in TABLES)
    assert publications == (0,)


def test_large_texts_are_stored_out_of_line(dsn):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attrelid::regclass::text, attname, attstorage FROM pg_attribute"
            " WHERE (attrelid, attname) IN (('customers'::regclass, 'bio'),"
            " ('products'::regclass, 'description'))"
        ).fetchall()
    assert sorted(rows) == [("customers", "bio", "e"), ("products", "description", "e")]
