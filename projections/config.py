"""Projection settings: environment variables with defaults that point at the local stack."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ConfigError", "Settings", "mask_url"]

ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and what is expected."""


def mask_url(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


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

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        api = env.get("QUERY_API") or "127.0.0.1:6066"
        host, sep, port = api.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"QUERY_API={api!r} must be host:port, e.g. 127.0.0.1:6066")
        return cls(
            kafka_bootstrap=env.get("KAFKA_BOOTSTRAP") or "127.0.0.1:59092",
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:56379/0",
            clickhouse_url=env.get("CLICKHOUSE_URL") or f"chdb://{ROOT / '.local' / 'clickhouse'}",
            api_host=host,
            api_port=int(port),
            api_token=env.get("API_TOKEN") or None,
            topic_prefix=env.get("TOPIC_PREFIX") or env.get("CDC_TOPIC_PREFIX") or "shop",
            pg_dsn=env.get("PG_DSN") or "postgresql://postgres@127.0.0.1:55432/shop",
        )
