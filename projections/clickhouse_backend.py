"""One small interface to ClickHouse, two backends: embedded chdb and a server.

`open_backend(url)` picks by scheme: ``chdb:///abs/path`` runs the engine
in-process on that data directory (one process at a time may open it: chdb
holds an exclusive lock, and one process may open only one directory);
``http(s)://user:pass@host:port/db`` talks to a server through
clickhouse-connect. The SQL is the same for both; parameters are always bound
server-side with ClickHouse's ``{name:Type}`` placeholders, never formatted
into the text.

Rows go in as JSON-ready values (Decimals and timestamps as strings, the way
they arrive in the change envelopes) encoded once with orjson as
JSONCompactEachRow, which both backends accept unchanged.
"""

from __future__ import annotations

import atexit
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit

import orjson

from projections.config import mask_url

__all__ = [
    "Backend",
    "BackendError",
    "ChdbBackend",
    "QueryResult",
    "ServerBackend",
    "open_backend",
    "render_settings",
    "split_statements",
]

Settings = Mapping[str, Any]
Params = Mapping[str, Any]

# Session settings both backends run with: results in UTC, and JSON output that
# keeps big integers and decimals exact (as strings, converted back below).
_SESSION_SETTINGS: Final[dict[str, Any]] = {
    "session_timezone": "UTC",
    "output_format_json_quote_64bit_integers": 1,
    "output_format_json_quote_decimals": 1,
    "date_time_input_format": "best_effort",
}
# The embedded writer's connection (batch inserts, the bulk load) runs on one thread.
# chdb shares the worker's cores with the Redis pipeline, the API and, on a small
# machine, the whole stack: a batch insert spread over every core starved them in
# bursts. At 2,000 changes/s on 2 cores (bench/freshness.py) the first runs after the
# change gave commit -> Redis p99 267-330 ms against 570-750 ms just before, ClickHouse
# p99 1.3 s against 1.9-2.4 s; later runs on a more starved machine spread 550-1,170 ms
# (docs/projections.md, Benchmarks). Throughput and bulk loads did not slow down.
_WRITER_SETTINGS: Final[dict[str, Any]] = {
    "max_threads": 1,
    "max_insert_threads": 1,
    "input_format_parallel_parsing": 0,
}
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BackendError(RuntimeError):
    """ClickHouse refused or could not run something; the message says what (never a password)."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class Backend(Protocol):
    """What the sink needs from ClickHouse. `database` is the URL's database, if it names one."""

    database: str | None

    def command(self, sql: str, params: Params | None = None) -> None: ...

    def query(
        self,
        sql: str,
        params: Params | None = None,
        settings: Settings | None = None,
        database: str | None = None,
    ) -> QueryResult: ...

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        settings: Settings | None = None,
    ) -> None: ...

    def insert_raw(
        self,
        table: str,
        column_names: Sequence[str],
        fmt: str,
        data: bytes,
        settings: Settings | None = None,
    ) -> None:
        """Insert rows already encoded in ClickHouse input format `fmt` (whole rows)."""
        ...

    def exchange_tables(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Swap each pair of (qualified) table names: one switch, as far as readers can tell."""
        ...

    def close(self) -> None: ...


def open_backend(url: str) -> Backend:
    """``chdb:///abs/path`` (embedded) or ``http(s)://user:pass@host:port/db`` (server)."""
    scheme = url.partition("://")[0].lower()
    if scheme == "chdb":
        return ChdbBackend(_chdb_path(url))
    if scheme in ("http", "https"):
        return ServerBackend(url)
    raise BackendError(
        f"CLICKHOUSE_URL {mask_url(url)!r} has an unknown scheme; expected "
        "chdb:///absolute/data/dir (embedded) or http(s)://user:password@host:port/database"
    )


def _chdb_path(url: str) -> Path:
    rest = url[len("chdb://") :]
    if not rest.startswith("/") or rest.startswith("//"):
        raise BackendError(
            f"CLICKHOUSE_URL {url!r}: an embedded data directory must be absolute, "
            "e.g. chdb:///var/lib/readside/clickhouse (three slashes)"
        )
    if "?" in rest or "#" in rest:
        raise BackendError(f"CLICKHOUSE_URL {url!r}: chdb URLs take a path only, no ?options")
    return Path(rest)


# ---- SQL text ---------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
      '(?:[^'\\]|\\.|'')*'        # string literal ('' and \' escapes)
    | "(?:[^"\\]|\\.|"")*"        # quoted identifier
    | `(?:[^`\\]|\\.|``)*`        # quoted identifier
    | \$(\w*)\$.*?\$\1\$           # heredoc string ($$...$$, $tag$...$tag$)
    | --[^\n]*                    # line comment
    | \#[^\n]*                    # line comment (ClickHouse accepts # too)
    | /\*.*?\*/                   # block comment
    | ;                           # statement separator
    | [^'"`$\-#/;]+ | [$\-#/]     # anything else
    """,
    re.S | re.X,
)


def split_statements(sql: str) -> list[str]:
    """The statements of a SQL text, split at ``;`` outside literals and comments.

    Comments are dropped; empty statements are left out. An unterminated
    literal or comment raises BackendError (ClickHouse would reject it too).
    """
    statements: list[str] = []
    current: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(sql):
        if match.start() != pos:
            break
        pos = match.end()
        token = match.group()
        if token == ";":
            statements.append("".join(current).strip())
            current = []
        elif token.startswith(("--", "#")) or (token.startswith("/*") and len(token) > 1):
            current.append(" ")
        else:
            current.append(token)
    if pos != len(sql):
        raise BackendError(
            f"SQL has an unterminated string, quoted name or comment near {sql[pos : pos + 40]!r}"
        )
    statements.append("".join(current).strip())
    return [s for s in statements if s]


def render_settings(settings: Settings) -> str:
    """``k1=v1, k2='v2'`` for a SETTINGS clause; names are checked, strings quoted."""
    parts = []
    for name, value in settings.items():
        if not _SETTING_NAME.match(name):
            raise BackendError(f"setting name {name!r} is not an identifier")
        parts.append(f"{name}={_literal(value)}")
    return ", ".join(parts)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


# ---- result conversion (chdb's JSONCompact -> Python values like clickhouse-connect's) ----


def _strip_wrappers(type_name: str) -> tuple[str, bool]:
    nullable = False
    while True:
        if type_name.startswith("Nullable("):
            nullable, type_name = True, type_name[9:-1]
        elif type_name.startswith("LowCardinality("):
            type_name = type_name[15:-1]
        else:
            return type_name, nullable


def _to_datetime(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _converter(type_name: str) -> Any:
    base, _ = _strip_wrappers(type_name)
    if base.startswith("Decimal"):
        return Decimal
    if base in ("Int64", "UInt64", "Int128", "UInt128", "Int256", "UInt256"):
        return int
    if base.startswith("DateTime"):
        return _to_datetime
    if base in ("Date", "Date32"):
        return date.fromisoformat
    return None


def _rows_from_json(payload: bytes) -> QueryResult:
    if not payload:
        return QueryResult((), [])
    doc = orjson.loads(payload)
    meta = doc.get("meta", [])
    columns = tuple(m["name"] for m in meta)
    converters = [(i, c) for i, m in enumerate(meta) if (c := _converter(m["type"])) is not None]
    rows: list[tuple[Any, ...]] = []
    for raw in doc.get("data", []):
        for i, convert in converters:
            value = raw[i]
            if value is not None:
                raw[i] = convert(value)
        rows.append(tuple(raw))
    return QueryResult(columns, rows)


_CHUNK_ROWS: Final = 1000


def encode_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    """JSONCompactEachRow: the rows as JSON arrays, separated by commas.

    One orjson call for the whole block (the outer brackets cut off) is ~3x
    faster than one call per row; ClickHouse accepts commas between rows.
    """
    return orjson.dumps(rows if isinstance(rows, list) else list(rows))[1:-1]


# ---- embedded ---------------------------------------------------------------------


class _SwitchLock:
    """Many queries at once, or one table switch alone (a readers-writer lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def acquire_shared(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._writing = True  # new readers wait from here on
            self._cond.wait_for(lambda: not self._readers)

    def release_exclusive(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


class ChdbBackend:
    """The ClickHouse engine in this process (chdb), on one data directory.

    chdb allows one data directory per process: a second backend on another
    directory fails until every connection to the first is closed.
    """

    def __init__(self, path: Path) -> None:
        from chdb._exceptions import ChdbError
        from chdb.state import sqlitelike

        self.database: str | None = None
        self.path = path
        self._sqlitelike = sqlitelike
        self._error: type[Exception] = ChdbError
        path.mkdir(parents=True, exist_ok=True)
        # Writes and reads on connections of their own: a query (the API's)
        # does not wait behind a batch insert of the worker.
        self._lock = threading.Lock()
        self._conn = self._connect({**_SESSION_SETTINGS, **_WRITER_SETTINGS})
        self._read_lock = threading.Lock()
        self._read_conn = self._connect(_SESSION_SETTINGS)
        # ClickHouse swaps several table pairs one after the other: queries wait
        # for the whole switch (exchange_tables), so none sees half of it
        self._switch = _SwitchLock()
        # chdb may crash in its own shutdown when the interpreter exits with a
        # connection still open: close it first.
        atexit.register(self.close)

    def _connect(
        self, settings: Settings, database: str | None = None, readonly: Any = None
    ) -> Any:
        try:
            conn = self._sqlitelike.Connection(str(self.path))
        except Exception as exc:
            raise BackendError(
                f"cannot open the embedded ClickHouse (chdb) at {self.path}: {exc}. Only one "
                "process may open a data directory, and a process only one directory; is a "
                "projection worker already running on it?"
            ) from None
        try:
            for name, value in settings.items():
                conn.query(f"SET {render_settings({name: value})}")
            if database is not None:
                if not _SETTING_NAME.match(database):
                    raise BackendError(f"database name {database!r} is not an identifier")
                conn.query(f"USE {database}")
            if readonly is not None:
                conn.query(f"SET {render_settings({'readonly': readonly})}")
        except (self._error, RuntimeError) as exc:
            conn.close()
            raise BackendError(str(exc)) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def command(self, sql: str, params: Params | None = None) -> None:
        with self._lock:
            self._run(self._conn, sql, params)

    def query(
        self,
        sql: str,
        params: Params | None = None,
        settings: Settings | None = None,
        database: str | None = None,
    ) -> QueryResult:
        self._switch.acquire_shared()
        try:
            return self._query(sql, params, settings, database)
        finally:
            self._switch.release_shared()

    def exchange_tables(self, pairs: Sequence[tuple[str, str]]) -> None:
        if not pairs:
            return
        self._switch.acquire_exclusive()
        try:
            self.command("EXCHANGE TABLES " + ", ".join(f"{a} AND {b}" for a, b in pairs))
        finally:
            self._switch.release_exclusive()

    def _query(
        self,
        sql: str,
        params: Params | None,
        settings: Settings | None,
        database: str | None,
    ) -> QueryResult:
        if not settings and database is None:
            with self._read_lock:
                return _rows_from_json(self._run(self._read_conn, sql, params, "JSONCompact"))
        # Settings go on a throwaway session, set before the query: a readonly=1
        # session refuses every later attempt to change them (also from the SQL).
        settings = settings or {}
        ordered = {**_SESSION_SETTINGS, **{k: v for k, v in settings.items() if k != "readonly"}}
        conn = self._connect(ordered, database, settings.get("readonly"))
        try:
            return _rows_from_json(self._run(conn, sql, params, "JSONCompact"))
        finally:
            conn.close()

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        settings: Settings | None = None,
    ) -> None:
        if not rows:
            return
        statement = f"INSERT INTO {table} ({', '.join(column_names)})"
        if settings:
            statement += f" SETTINGS {render_settings(settings)}"
        rows = rows if isinstance(rows, list) else list(rows)
        with self._lock:
            try:
                inserter = self._conn.send_insert(statement, "JSONCompactEachRow")
                with inserter:
                    # in chunks: orjson holds the GIL for a whole call, and a block of
                    # 20k events is ~30 MB (tens of ms the event loop, with the Redis
                    # pipeline and the API, would wait)
                    for i in range(0, len(rows), _CHUNK_ROWS):
                        chunk = encode_rows(rows[i : i + _CHUNK_ROWS])
                        inserter.append(b"," + chunk if i else chunk)
                    inserter.finish()
            except (self._error, RuntimeError) as exc:
                raise BackendError(
                    f"insert into {table} ({len(rows)} rows) failed: {exc}"
                ) from None

    def insert_raw(
        self,
        table: str,
        column_names: Sequence[str],
        fmt: str,
        data: bytes,
        settings: Settings | None = None,
    ) -> None:
        statement = f"INSERT INTO {table} ({', '.join(column_names)})"
        if settings:
            statement += f" SETTINGS {render_settings(settings)}"
        with self._lock:
            try:
                inserter = self._conn.send_insert(statement, fmt)
                with inserter:
                    inserter.append(data)
                    inserter.finish()
            except (self._error, RuntimeError) as exc:
                raise BackendError(f"insert into {table} ({fmt}) failed: {exc}") from None

    def _run(self, conn: Any, sql: str, params: Params | None, fmt: str = "CSV") -> bytes:
        try:
            result = conn.query(sql, fmt, params=dict(params) if params else None)
        except (self._error, RuntimeError) as exc:
            raise BackendError(str(exc)) from None
        payload: bytes = result.bytes() if result is not None else b""
        return payload

    def close(self) -> None:
        with self._read_lock:
            if self._read_conn is not None:
                self._read_conn.close()
                self._read_conn = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# ---- server -----------------------------------------------------------------------


class ServerBackend:
    """A ClickHouse server through clickhouse-connect (HTTP)."""

    def __init__(self, url: str) -> None:
        import clickhouse_connect

        parts = urlsplit(url)
        self._password = unquote(parts.password or "")
        self._masked = mask_url(url)
        path = parts.path.strip("/")
        self.database: str | None = unquote(path) if path else None
        try:
            self._client = clickhouse_connect.get_client(
                host=parts.hostname or "localhost",
                port=parts.port or (8443 if parts.scheme == "https" else 8123),
                username=unquote(parts.username or "default"),
                password=self._password,
                secure=parts.scheme == "https",
                settings={
                    k: v for k, v in _SESSION_SETTINGS.items() if not k.startswith("output_")
                },
            )
        except Exception as exc:
            raise BackendError(
                f"cannot connect to the ClickHouse server at {self._masked}: {self._scrub(exc)}"
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._password, "***") if self._password else text

    def command(self, sql: str, params: Params | None = None) -> None:
        try:
            self._client.command(sql, parameters=dict(params) if params else None)
        except Exception as exc:
            raise BackendError(self._scrub(exc)) from None

    def exchange_tables(self, pairs: Sequence[tuple[str, str]]) -> None:
        # one statement; the server swaps the pairs one after the other (each atomic),
        # so a query of another client may see some swapped, not all (docs/projections.md)
        if pairs:
            self.command("EXCHANGE TABLES " + ", ".join(f"{a} AND {b}" for a, b in pairs))

    def query(
        self,
        sql: str,
        params: Params | None = None,
        settings: Settings | None = None,
        database: str | None = None,
    ) -> QueryResult:
        merged = dict(settings or {})
        if database is not None:
            merged["database"] = database
        try:
            result = self._client.query(
                sql, parameters=dict(params) if params else None, settings=merged
            )
        except Exception as exc:
            raise BackendError(self._scrub(exc)) from None
        return QueryResult(tuple(result.column_names), [tuple(r) for r in result.result_rows])

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        settings: Settings | None = None,
    ) -> None:
        if not rows:
            return
        try:
            self._client.raw_insert(
                table,
                column_names=list(column_names),
                insert_block=encode_rows(rows),
                settings={"date_time_input_format": "best_effort", **(settings or {})},
                fmt="JSONCompactEachRow",
            )
        except Exception as exc:
            raise BackendError(
                f"insert into {table} ({len(rows)} rows) failed: {self._scrub(exc)}"
            ) from None

    def insert_raw(
        self,
        table: str,
        column_names: Sequence[str],
        fmt: str,
        data: bytes,
        settings: Settings | None = None,
    ) -> None:
        try:
            self._client.raw_insert(
                table, column_names=list(column_names), insert_block=data, settings=dict(settings or {}), fmt=fmt
            )
        except Exception as exc:
            raise BackendError(f"insert into {table} ({fmt}) failed: {self._scrub(exc)}") from None

    def close(self) -> None:
        self._client.close()
