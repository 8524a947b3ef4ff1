"""Capture settings: environment variables with defaults that point at the local stack."""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["TEXT_OPTIONS", "ConfigError", "Settings", "mask_dsn"]

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_MODES = ("initial", "never", "initial_only")
DEFAULT_FULL_IDENTITY = ("customers", "products")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Session settings under which Postgres writes values in the text forms cdc/values.py parses
TEXT_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and what is expected."""


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced, fit for logs and error messages."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    if "password" in params:
        params["password"] = "***"
    host = params.get("host", "")
    port = params.get("port", "5432")
    db = params.get("dbname", "")
    user = params.get("user", "")
    return f"postgresql://{user}{':***' if 'password' in params else ''}@{host}:{port}/{db}"


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    pg_dsn: str = "postgresql://postgres@127.0.0.1:55432/shop"
    kafka_bootstrap: str = "127.0.0.1:59092"
    slot: str = "readside"
    publication: str = "readside"
    schema: str = "public"
    # empty = every table of the schema
    tables: tuple[str, ...] = ()
    # tables that get REPLICA IDENTITY FULL (full before-images); None = those of
    # DEFAULT_FULL_IDENTITY that are published (the shop's rules compare old and
    # new prices and profile fields, which needs before-images)
    full_identity: tuple[str, ...] | None = None
    topic_prefix: str = "shop"
    partitions: int = 6
    snapshot_mode: str = "initial"
    snapshot_chunk: int = 10_000
    max_in_flight: int = 50_000
    status_interval_s: float = 1.0
    watermark_interval_s: float = 0.5
    # while changes flow, a Watermark at most this often: a read with min_lsn waits for
    # one past its LSN on every partition, so this is part of every such read's wait
    watermark_every_ms: int = 50
    metrics_port: int = 9187
    # the walsender's logical_decoding_work_mem: transactions bigger than this are
    # streamed to us while in progress (and spooled to disk until they commit)
    decoding_work_mem: str | None = None
    spool_dir: Path = field(default_factory=lambda: ROOT / ".local" / "cdc" / "spool")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        d = cls.__new__(cls)
        for f in fields(cls):
            object.__setattr__(d, f.name, f.default_factory() if f.default is MISSING else f.default)  # type: ignore[operator]
        values: dict[str, object] = {
            "pg_dsn": env.get("PG_DSN") or d.pg_dsn,
            "kafka_bootstrap": env.get("KAFKA_BOOTSTRAP") or d.kafka_bootstrap,
            "slot": env.get("CDC_SLOT") or d.slot,
            "publication": env.get("CDC_PUBLICATION") or d.publication,
            "schema": env.get("CDC_SCHEMA") or d.schema,
            "tables": _split(env.get("CDC_TABLES", "")),
            "full_identity": _split(env["CDC_FULL_IDENTITY"]) if "CDC_FULL_IDENTITY" in env else None,
            "topic_prefix": env.get("CDC_TOPIC_PREFIX") or d.topic_prefix,
            "partitions": _env_int("CDC_PARTITIONS", d.partitions),
            "snapshot_mode": env.get("CDC_SNAPSHOT_MODE") or d.snapshot_mode,
            "snapshot_chunk": _env_int("CDC_SNAPSHOT_CHUNK", d.snapshot_chunk),
            "max_in_flight": _env_int("CDC_MAX_IN_FLIGHT", d.max_in_flight, minimum=100),
            "watermark_every_ms": _env_int("CDC_WATERMARK_EVERY_MS", d.watermark_every_ms),
            "metrics_port": _env_int("CDC_METRICS_PORT", d.metrics_port, minimum=0),
            "decoding_work_mem": env.get("CDC_DECODING_WORK_MEM") or None,
        }
        if env.get("CDC_SPOOL_DIR"):
            values["spool_dir"] = Path(env["CDC_SPOOL_DIR"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("slot", "publication"):
            value = getattr(self, name)
            if not _IDENT.match(value):
                raise ConfigError(
                    f"{name} {value!r} is not a valid name: use lower-case letters, digits "
                    "and underscores, starting with a letter (at most 63 characters)"
                )
        for table in (*self.tables, *(self.full_identity or ())):
            if not _IDENT.match(table):
                raise ConfigError(f"table name {table!r} is not a plain lower-case identifier")
        if self.snapshot_mode not in SNAPSHOT_MODES:
            raise ConfigError(
                f"snapshot mode {self.snapshot_mode!r} is unknown; use one of {', '.join(SNAPSHOT_MODES)}"
            )
        if not re.match(r"^[A-Za-z0-9._-]+$", self.topic_prefix):
            raise ConfigError(f"topic prefix {self.topic_prefix!r} may only hold letters, digits, '.', '_' and '-'")
        if self.decoding_work_mem is not None and not re.match(r"^[0-9]+(kB|MB|GB)$", self.decoding_work_mem):
            raise ConfigError(f"CDC_DECODING_WORK_MEM={self.decoding_work_mem!r} must look like 64kB, 64MB or 1GB")
        try:
            conninfo_to_dict(self.pg_dsn)
        except Exception:
            raise ConfigError(f"PG_DSN is not a valid connection string: {mask_dsn(self.pg_dsn)}") from None

    def replication_dsn(self) -> str:
        """The DSN for the walsender: text output in UTC/ISO forms that cdc/values.py parses."""
        options = TEXT_OPTIONS
        if self.decoding_work_mem:
            options += f" -c logical_decoding_work_mem={self.decoding_work_mem}"
        return make_conninfo(
            self.pg_dsn, replication="database", application_name=f"readside-cdc-{self.slot}", options=options
        )

    def query_dsn(self) -> str:
        return make_conninfo(
            self.pg_dsn,
            application_name=f"readside-cdc-{self.slot}",
            options=TEXT_OPTIONS,
        )


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())
