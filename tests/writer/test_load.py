"""The load generator runs the plan against the database and counts what happened."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import pytest_asyncio

from writer.load import LoadConfig, ensure_catalogue, run_load, summary
from writer.migrate import migrate
from writer.plan import plan


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def catalogue(dsn):
    await ensure_catalogue(dsn, seed=1)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_run_of_n_commands_runs_exactly_the_planned_commands(dsn, pool):
    config = LoadConfig(rate=0, duration=0, concurrency=4, seed=5, commands=400)
    stats, _ = await run_load(dsn, config)
    planned = Counter(c.kind for stream in plan(5, 4, 400) for c in stream)
    ran = stats.ok + stats.refused + stats.skipped
    assert ran == planned
    assert not stats.failures, stats.first_failure


@pytest.mark.asyncio(loop_scope="session")
async def test_a_run_moves_orders_through_their_lifecycle(dsn, db):
    before = dict(await db.fetch("SELECT status::text, count(*) FROM orders GROUP BY 1"))
    await run_load(dsn, LoadConfig(concurrency=2, seed=9, commands=300, duration=0))
    after = dict(await db.fetch("SELECT status::text, count(*) FROM orders GROUP BY 1"))
    for status in ("pending", "paid", "shipped"):
        assert after.get(status, 0) > before.get(status, 0), status


@pytest.mark.asyncio(loop_scope="session")
async def test_a_target_rate_is_not_exceeded(dsn):
    config = LoadConfig(rate=100, duration=1.0, concurrency=4, seed=2)
    stats, elapsed = await run_load(dsn, config)
    assert stats.attempted + sum(stats.skipped.values()) <= 100 * elapsed + 4
    assert stats.attempted > 50


@pytest.mark.asyncio(loop_scope="session")
async def test_the_duration_ends_the_run(dsn):
    stats, elapsed = await run_load(dsn, LoadConfig(rate=0, duration=0.5, concurrency=2))
    assert 0.5 <= elapsed < 3
    assert stats.attempted > 0


@pytest.mark.asyncio(loop_scope="session")
async def test_the_summary_reports_rate_latency_and_counts(dsn):
    config = LoadConfig(concurrency=2, seed=4, commands=100, duration=0)
    stats, elapsed = await run_load(dsn, config)
    result = summary(stats, elapsed, config)
    assert result["commands"] == stats.attempted
    assert (
        0
        < result["latency_ms"]["p50"]
        <= result["latency_ms"]["p99"]
        <= result["latency_ms"]["max"]
    )
    assert result["ok"] + result["refused"] == result["commands"]
    assert sum(row["ok"] for row in result["per_command"].values()) == result["ok"]


def test_load_on_an_empty_shop_bootstraps_a_catalogue_and_prints_json(fresh_database):
    empty = fresh_database("load_empty")
    migrate(empty)
    out = subprocess.run(
        [sys.executable, "-m", "writer", "load", "--dsn", empty, "--commands", "60",
         "--duration", "0", "--concurrency", "2", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["commands"] + result["skipped"] == 60
    assert result["failures"] == {}
    assert "bootstrapped 100 customers and 50 products" in out.stderr


@pytest.mark.asyncio(loop_scope="session")
async def test_the_live_view_shows_rate_latency_and_errors(dsn):
    import io

    from rich.console import Console

    from writer.display import LiveView

    screen = io.StringIO()
    config = LoadConfig(rate=200, duration=1.2, concurrency=2, seed=6)
    with LiveView(config, Console(file=screen, width=120)) as view:
        await run_load(dsn, config, tick=view)
    shown = screen.getvalue()
    for label in ("commands/s", "p50 ms", "p99 ms", "failures", "refused", "place_order"):
        assert label in shown
