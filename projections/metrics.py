"""Prometheus metrics of the projection worker, served at GET /metrics by the query API.

One registry per worker (not the process-wide default), so several workers
in one test process do not collide. Labels are projection names and
topics only: never a URL, a DSN or anything holding a secret.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["CONTENT_TYPE_LATEST", "ProjectionMetrics"]

_BATCH_SIZES = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_LATENCIES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProjectionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "projection_events", "Domain events applied (redeliveries included)",
            ["projection"], registry=r,
        )  # fmt: skip
        self.records = Counter(
            "projection_records", "Kafka records consumed (events, watermarks, dead letters)",
            ["projection"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "projection_batch_size", "Records per batch", ["projection"],
            buckets=_BATCH_SIZES, registry=r,
        )  # fmt: skip
        self.apply_seconds = Histogram(
            "projection_apply_seconds", "Time to apply one batch to the sink", ["projection"],
            buckets=_LATENCIES, registry=r,
        )  # fmt: skip
        self.watermark = Gauge(
            "projection_watermark_lsn", "Applied watermark (min over partitions), as an integer LSN",
            ["projection"], registry=r,
        )  # fmt: skip
        self.lag_bytes = Gauge(
            "projection_lag_bytes", "Newest watermark seen minus the applied watermark (WAL bytes)",
            ["projection"], registry=r,
        )  # fmt: skip
        self.lag_seconds = Gauge(
            "projection_lag_seconds", "Commit time of the newest watermark seen minus that of the applied one",
            ["projection"], registry=r,
        )  # fmt: skip
        self.offset_lag = Gauge(
            "projection_offset_lag", "Records in Kafka not applied yet (sum over partitions)",
            ["projection"], registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "projection_dead_letters", "Records sent to a dead-letter topic",
            ["projection", "stage"], registry=r,
        )  # fmt: skip
        self.upcasts = Counter(
            "projection_upcasts", "Events upcast from an older event_version",
            ["projection"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "projection_errors", "Failed apply attempts (retried; see the worker log)",
            ["projection", "kind"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "query_api_requests", "Query API requests", ["route", "status"], registry=r,
        )  # fmt: skip

    def render(self, *others: bytes) -> bytes:
        """The text exposition; `others` are other processes' (the Redis process's) expositions,
        their samples merged into the same families."""
        if not any(others):
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, others))


class _Merged:
    """A registry's families with other expositions' samples added (one family per name)."""

    def __init__(self, registry: CollectorRegistry, others: tuple[bytes, ...]) -> None:
        self.registry = registry
        self.others = others

    def collect(self) -> Iterator[Metric]:
        extra: dict[str, Metric] = {}
        for text in self.others:
            for family in text_string_to_metric_families(text.decode()):
                if family.name in extra:
                    extra[family.name].samples.extend(family.samples)
                else:
                    extra[family.name] = family
        for family in self.registry.collect():
            more = extra.pop(family.name, None)
            if more is not None:
                family.samples.extend(more.samples)
            yield family
        yield from extra.values()
