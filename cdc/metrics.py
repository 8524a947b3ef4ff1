"""Prometheus metrics of the capture process (served on CDC_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["CaptureMetrics"]


class CaptureMetrics:
    def __init__(self, slot: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = {"slot": slot}
        r = self.registry
        self.changes = Counter("cdc_row_changes_total", "Row changes decoded", ["slot"], registry=r).labels(**labels)
        self.events = Counter("cdc_events_total", "Domain events published", ["slot"], registry=r).labels(**labels)
        self.bytes = Counter("cdc_event_bytes_total", "Bytes of event values published", ["slot"], registry=r).labels(**labels)
        self.transactions = Counter("cdc_transactions_total", "Transactions published", ["slot"], registry=r).labels(**labels)
        self.snapshot_rows = Counter("cdc_snapshot_rows_total", "Rows read by snapshots", ["slot"], registry=r).labels(**labels)
        self.errors = Counter("cdc_errors_total", "Errors by kind", ["slot", "kind"], registry=r)
        self.confirmed_lsn = Gauge("cdc_confirmed_lsn", "LSN confirmed to Postgres (flush position)", ["slot"], registry=r).labels(**labels)
        self.received_lsn = Gauge("cdc_received_lsn", "Newest WAL position received from the server", ["slot"], registry=r).labels(**labels)
        self.lag_bytes = Gauge("cdc_lag_bytes", "Received minus confirmed LSN", ["slot"], registry=r).labels(**labels)
        self.lag_seconds = Gauge("cdc_lag_seconds", "Now minus the commit time of the newest published transaction, while behind", ["slot"], registry=r).labels(**labels)
        self.in_flight = Gauge("cdc_in_flight_messages", "Messages queued and not yet acknowledged by Kafka", ["slot"], registry=r).labels(**labels)
        self.batch_size = Histogram(
            "cdc_read_batch_messages", "Replication messages per read batch", ["slot"], registry=r,
            buckets=(1, 10, 100, 500, 1000, 2000, 4096),
        ).labels(**labels)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
