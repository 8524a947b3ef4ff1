"""How a load run looks on a terminal: a live panel, and the final summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from writer.latency import LatencyHistogram
from writer.load import LoadConfig, Stats

__all__ = ["LiveView", "print_summary"]


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class LiveView:
    """Redrawn at every tick of the load (twice a second): rate, latency, errors."""

    def __init__(self, config: LoadConfig, console: Console) -> None:
        self.config = config
        self.live = Live(console=console, auto_refresh=False, transient=False)
        self.last_elapsed = 0.0
        self.shown: tuple[LatencyHistogram, int, float] | None = None

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def __call__(self, stats: Stats, elapsed: float) -> None:
        span = elapsed - self.last_elapsed
        if span < 0.25 and self.shown is not None:
            # a short last tick (the run just ended): its rate would be noise
            window, failures, span = self.shown
        else:
            window, failures = stats.window, stats.window_failures
            self.shown = (window, failures, span)
            self.last_elapsed = elapsed
            stats.window = LatencyHistogram()
            stats.window_failures = 0
        self.live.update(self._render(stats, window, failures, span, elapsed), refresh=True)

    def _render(
        self, stats: Stats, window: LatencyHistogram, failures: int, span: float, elapsed: float
    ) -> Group:
        c = self.config
        target = f"{c.rate:g}/s" if c.rate else "max"
        until = f"{c.duration:g} s" if c.duration else "Ctrl-C"
        head = Text.assemble(
            ("writer load ", "bold"),
            f"seed {c.seed}  workers {c.concurrency}  target {target}  until {until}  ",
            (f"{elapsed:6.1f} s", "cyan"),
        )
        table = Table(box=None, pad_edge=False)
        table.add_column("")
        table.add_column("last 0.5 s", justify="right")
        table.add_column("whole run", justify="right")
        table.add_row(
            "commands/s",
            f"{window.count / span:,.0f}",
            f"{stats.attempted / max(elapsed, 1e-6):,.0f}",
        )
        table.add_row(
            "p50 ms", _fmt_ms(window.percentile(50)), _fmt_ms(stats.latency.percentile(50))
        )
        table.add_row(
            "p99 ms", _fmt_ms(window.percentile(99)), _fmt_ms(stats.latency.percentile(99))
        )
        table.add_row("max ms", _fmt_ms(window.max), _fmt_ms(stats.latency.max))
        table.add_row(
            "failures",
            str(failures),
            Text(str(sum(stats.failures.values())), style="red" if stats.failures else ""),
        )
        table.add_row("refused", "", str(sum(stats.refused.values())))
        per = Table(box=None, pad_edge=False)
        for name in ("command", "ok", "refused", "skipped", "p99 ms"):
            per.add_column(name, justify="left" if name == "command" else "right")
        for kind in sorted(stats.by_command):
            per.add_row(
                kind,
                f"{stats.ok[kind]:,}",
                f"{stats.refused[kind]:,}",
                f"{stats.skipped[kind]:,}",
                _fmt_ms(stats.by_command[kind].percentile(99)),
            )
        parts: list[Any] = [head, table, per]
        if stats.refusals:
            parts.append(
                Text("refusals: " + ", ".join(f"{k} {v}" for k, v in stats.refusals.most_common()))
            )
        for name, message in stats.first_failure.items():
            parts.append(Text(f"{name}: {message}", style="red"))
        return Group(*parts)


def print_summary(result: dict[str, Any], console: Console) -> None:
    lat = result["latency_ms"]
    console.print(
        f"[bold]writer load[/bold]: {result['commands']:,} commands in {result['elapsed_s']:.1f} s"
        f" = [bold]{result['rate']:,.1f}/s[/bold] with {result['concurrency']} workers"
        f" (seed {result['seed']}, target {result['target_rate'] or 'max'})"
    )
    console.print(
        f"latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}"
        f"  max {lat['max']:.2f}"
    )
    table = Table(box=None, pad_edge=False)
    for name in ("command", "ok", "refused", "skipped", "p50 ms", "p99 ms"):
        table.add_column(name, justify="left" if name == "command" else "right")
    for kind, row in result["per_command"].items():
        table.add_row(
            kind, f"{row['ok']:,}", f"{row['refused']:,}", f"{row['skipped']:,}",
            f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
        )  # fmt: skip
    console.print(table)
    if result["domain_errors"]:
        console.print(
            "domain errors: " + ", ".join(f"{k} {v:,}" for k, v in result["domain_errors"].items())
        )
    for name, count in result["failures"].items():
        console.print(f"[red]failures: {name} x{count}: {result['first_failure'][name]}[/red]")
