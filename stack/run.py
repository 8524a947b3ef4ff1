"""The main job in one command (``make run``): seed a small shop if it is empty,
start the capture, the projection worker and the writer's load, and show a
live dashboard until Ctrl-C, which stops them all.

Run after ``make up`` and ``make migrate`` (the Makefile does both).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".local" / "run"
PY = sys.executable
PG_DSN = os.environ.get("PG_DSN", "postgresql://postgres@127.0.0.1:55432/shop")
API = os.environ.get("QUERY_API", "127.0.0.1:6066")
CDC_METRICS = int(os.environ.get("CDC_METRICS_PORT", "9187"))
RATE = os.environ.get("RUN_RATE", "50")


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return LOGS / f"{self.name}.log"

    def start(self) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [PY, "-m", *self.args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def state(self) -> str:
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        return "running" if code is None else f"exited ({code}): see {self.log.relative_to(ROOT)}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Rates:
    """Per-second rates from successive samples of monotonic counters."""

    last: dict[str, tuple[float, float]] = field(default_factory=dict)

    def rate(self, name: str, value: float | None) -> float | None:
        if value is None:
            return None
        now = time.monotonic()
        prev = self.last.get(name)
        self.last[name] = (now, value)
        if prev is None or now <= prev[0]:
            return None
        return max(0.0, (value - prev[1]) / (now - prev[0]))


def seed_if_empty() -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute("select count(*) from customers").fetchone()
    if row and row[0] > 0:
        return
    print("run: seeding a small shop (2,000 customers, 200 products, 5,000 orders)")
    subprocess.run(
        [PY, "-m", "writer", "seed", "--customers", "2000", "--products", "200", "--orders", "5000"],
        cwd=ROOT, check=True,
    )  # fmt: skip


def fetch(url: str, timeout: float = 0.5) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def metric(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def write_counters(conn: psycopg.Connection[Any]) -> tuple[float, float]:
    row = conn.execute(
        """select xact_commit, tup_inserted + tup_updated + tup_deleted
             from pg_stat_database where datname = current_database()"""
    ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def fmt(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def render(children: list[Child], rates: Rates, conn: psycopg.Connection[Any], sample_user: str | None) -> Group:
    commits, rows = write_counters(conn)
    cdc_text = (fetch(f"http://127.0.0.1:{CDC_METRICS}/metrics") or b"").decode() or None
    status_raw = fetch(f"http://{API}/status")
    status = orjson.loads(status_raw) if status_raw else None

    top = Table.grid(padding=(0, 3))
    top.add_column(style="bold")
    top.add_column()
    top.add_row("writes", f"{fmt(rates.rate('tx', commits), ' commits/s')}   {fmt(rates.rate('rows', rows), ' row changes/s')}")
    top.add_row(
        "capture",
        f"{fmt(rates.rate('cdc_changes', metric(cdc_text, 'cdc_row_changes_total')), ' changes/s')}   "
        f"{fmt(rates.rate('cdc_events', metric(cdc_text, 'cdc_events_total')), ' events/s')}   "
        f"lag {fmt(metric(cdc_text, 'cdc_lag_bytes'), ' B')} / {fmt(metric(cdc_text, 'cdc_lag_seconds'), ' s', 1)}",
    )

    proj = Table(title="projections", expand=True)
    for col in ("projection", "events/s", "watermark", "lag (LSN bytes)", "lag (s)", "Kafka consumer lag", "DLQ"):
        proj.add_column(col)
    if status is None:
        proj.add_row("(query API not answering yet)", "", "", "", "", "", "")
    else:
        for name, p in sorted(status.get("projections", {}).items()):
            proj.add_row(
                name,
                fmt(rates.rate(f"applied_{name}", p.get("events_applied"))),
                str(p.get("watermark", "-")),
                fmt(p.get("lag_bytes")),
                fmt(p.get("lag_seconds"), digits=2),
                fmt(p.get("offset_lag")),
                fmt(p.get("dead_letters")),
            )

    procs = Table.grid(padding=(0, 3))
    for c in children:
        state = c.state()
        procs.add_row(c.name, Text(state, style="green" if state == "running" else "red"))

    uid = sample_user or "1"
    howto = Text(
        f"curl http://{API}/users/{uid}\n"
        f"curl 'http://{API}/analytics/revenue?from=2020-01-01&to=2030-01-01&group_by=day'\n"
        f"curl http://{API}/analytics/funnel     curl http://{API}/status\n"
        f"curl -X POST http://{API}/analytics/sql -d '{{\"sql\": \"select status, count() from orders_v group by status\"}}'\n"
        "a writer token as ?min_lsn=X/Y waits until the view has it.   logs: .local/run/   Ctrl-C stops everything",
        style="dim",
    )
    return Group(
        Panel(top, title="readside: Postgres -> cdc -> Kafka -> projections"),
        proj,
        Panel(procs, title="processes"),
        Panel(howto, title="how to query"),
    )


def main() -> None:
    seed_if_empty()
    children = [
        Child("cdc", ["cdc", "run"]),
        Child("projections", ["projections", "worker"]),
        Child("writer", ["writer", "load", "--rate", RATE, "--duration", "0", "--concurrency", "4"]),
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for c in children:
        c.start()
    rates = Rates()
    try:
        with psycopg.connect(PG_DSN, autocommit=True) as conn, Live(refresh_per_second=2, screen=False) as live:
            row = conn.execute("select min(id)::text from customers").fetchone()
            sample = row[0] if row else None
            while not stopping:
                live.update(render(children, rates, conn, sample))
                for _ in range(10):
                    if stopping:
                        break
                    time.sleep(0.1)
    finally:
        print("run: stopping writer, projections and cdc ...")
        for c in reversed(children):
            c.stop()
        for c in reversed(children):
            c.wait(30)
        print("run: stopped")


if __name__ == "__main__":
    main()
