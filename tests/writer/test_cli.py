"""The command line: clear one-line errors, no tracebacks, no passwords."""

from __future__ import annotations

import subprocess
import sys

import pytest

from writer.db import describe_target, mask_dsn


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "writer", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["migrate", "seed", "load"])
def test_an_unreachable_database_is_one_clear_line_and_a_failure(command):
    out = run(command, "--dsn", "postgresql://shopper:s3cret@127.0.0.1:1/shop")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "127.0.0.1:1/shop" in out.stderr
    assert "connection refused" in out.stderr and "make up" in out.stderr
    assert "Traceback" not in out.stderr
    assert "s3cret" not in out.stderr + out.stdout


def test_migrate_reports_an_up_to_date_database(dsn):
    out = run("migrate", "--dsn", dsn)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout


def test_seed_reports_rows_per_second(dsn):
    out = run("seed", "--dsn", dsn, "--customers", "20", "--products", "5", "--orders", "20")
    assert out.returncode == 0, out.stderr
    assert "20 customers" in out.stdout and "rows/s" in out.stdout


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:pw@h:1/db", "postgresql://u:***@h:1/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h password=pw user=u", "host=h password=*** user=u"),
        ("host=h password='p w' user=u", "host=h password=*** user=u"),
    ],
)
def test_passwords_are_masked_in_dsns(dsn, masked):
    assert mask_dsn(dsn) == masked


def test_the_target_of_a_dsn_names_host_port_and_database():
    assert describe_target("postgresql://u:pw@db.example:6543/shop") == "db.example:6543/shop"


def test_load_on_an_unmigrated_database_says_to_migrate(fresh_database):
    bare = fresh_database("cli_bare")
    out = run("load", "--dsn", bare, "--commands", "5", "--duration", "0")
    assert out.returncode == 1
    assert "writer migrate" in out.stderr and "Traceback" not in out.stderr
