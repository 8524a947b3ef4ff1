"""Projection settings: environment variables with defaults that point at the local stack."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AGGREGATES", "PROJECTIONS", "REDIS_AGGREGATES", "ConfigError", "Settings", "mask_url"]

ROOT = Path(__file__).resolve().parent.parent
# The aggregates whose topics the projections consume (cdc/rules.py AGGREGATES).
AGGREGATES = ("order", "customer", "product")
# The Redis views are built from the customers, orders, order_items and payments tables
# only: the customer and order aggregates. Product events (a stock change per placed
# order line, each carrying the whole product row) are most of the bytes in the topics;
# the Redis pipeline does not fetch and decode them. Watermarks are on every partition of
# every topic, so its watermark over these topics' partitions is exact for its views.
REDIS_AGGREGATES = ("order", "customer")
# The projections a worker can run; PROJECTIONS picks some (all by default).
PROJECTIONS = ("redis", "clickhouse")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and what is expected."""


def mask_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _int(env: os._Environ[str] | dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} must be between {lo} and {hi}")
    return value


def _event_loop(raw: str | None) -> str:
    """PROJECTIONS_EVENT_LOOP: uvloop (the default) or asyncio."""
    from projections.event_loop import EVENT_LOOPS

    name = (raw or "uvloop").strip().lower()
    if name not in EVENT_LOOPS:
        raise ConfigError(
            f"PROJECTIONS_EVENT_LOOP={raw!r} is not an event loop; expected {' or '.join(EVENT_LOOPS)}"
        )
    return name


def _projections(raw: str | None) -> tuple[str, ...]:
    """PROJECTIONS: the comma-separated projections this worker runs (all when unset)."""
    if raw is None or not raw.strip():
        return PROJECTIONS
    names = [n.strip() for n in raw.split(",")]
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise ConfigError(
            f"PROJECTIONS={raw!r}: unknown projection(s) {unknown}; expected a comma-separated "
            f"list of {', '.join(PROJECTIONS)}"
        )
    return tuple(n for n in PROJECTIONS if n in names)


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str
    redis_url: str
    clickhouse_url: str
    api_host: str
    api_port: int
    api_token: str | None
    topic_prefix: str
    pg_dsn: str
    # the worker (projections/app.py)
    app_id: str = "readside-projections"
    redis_namespace: str = "rs"
    data_dir: Path = field(default_factory=lambda: ROOT / ".local" / "projections")
    batch_max: int = 10000
    batch_wait_ms: int = 10
    clickhouse_batch_max: int = 20000
    clickhouse_batch_wait_ms: int = 500
    projections: tuple[str, ...] = PROJECTIONS
    event_loop: str = "uvloop"

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(f"{self.topic_prefix}.{agg}.events" for agg in AGGREGATES)

    @property
    def redis_topics(self) -> tuple[str, ...]:
        """The topics the Redis views are built from (REDIS_AGGREGATES)."""
        return tuple(f"{self.topic_prefix}.{agg}.events" for agg in REDIS_AGGREGATES)

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_url.startswith("chdb:")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        api = env.get("QUERY_API") or "127.0.0.1:6066"
        host, sep, port = api.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"QUERY_API={api!r} must be host:port, e.g. 127.0.0.1:6066")
        settings = cls(
            kafka_bootstrap=env.get("KAFKA_BOOTSTRAP") or "127.0.0.1:59092",
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:56379/0",
            clickhouse_url=env.get("CLICKHOUSE_URL") or f"chdb://{ROOT / '.local' / 'clickhouse'}",
            api_host=host,
            api_port=int(port),
            api_token=env.get("API_TOKEN") or None,
            topic_prefix=env.get("TOPIC_PREFIX") or env.get("CDC_TOPIC_PREFIX") or "shop",
            pg_dsn=env.get("PG_DSN") or "postgresql://postgres@127.0.0.1:55432/shop",
            app_id=env.get("PROJECTIONS_APP_ID") or "readside-projections",
            redis_namespace=env.get("REDIS_NAMESPACE") or "rs",
            data_dir=Path(env["PROJECTIONS_DATA_DIR"])
            if env.get("PROJECTIONS_DATA_DIR")
            else ROOT / ".local" / "projections",
            batch_max=_int(env, "PROJECTIONS_BATCH_MAX", 10_000, 1, 100_000),
            batch_wait_ms=_int(env, "PROJECTIONS_BATCH_WAIT_MS", 10, 1, 60_000),
            clickhouse_batch_max=_int(env, "PROJECTIONS_CH_BATCH_MAX", 20000, 1, 1_000_000),
            clickhouse_batch_wait_ms=_int(env, "PROJECTIONS_CH_BATCH_WAIT_MS", 500, 1, 60_000),
            projections=_projections(env.get("PROJECTIONS")),
            event_loop=_event_loop(env.get("PROJECTIONS_EVENT_LOOP")),
        )
        for name, value in (
            ("TOPIC_PREFIX", settings.topic_prefix),
            ("PROJECTIONS_APP_ID", settings.app_id),
            ("REDIS_NAMESPACE", settings.redis_namespace.replace(":", ".")),
        ):
            if not _NAME.match(value):
                raise ConfigError(
                    f"{name}={value!r} may only hold letters, digits, '.', '_' and '-'"
                )
        return settings
