"""The query API, served by the worker through Faust's web server (aiohttp). docs/query-api.md.

Every read takes ``min_lsn`` (a writer's consistency token, "X/Y") and
``timeout_ms``: it is answered once the projection it reads has applied a
watermark >= min_lsn, else with 504 and the current watermark; never a stale
answer passed off as fresh. Every answer says which watermark it reflects
(header ``X-Watermark-LSN`` and field ``watermark``): the watermark is read
before the data, and views only move forward, so the data is at least that
fresh. Parameters are validated into typed values and reach the stores as
arguments or bound parameters, never as SQL text.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any, Final

import faust
import orjson
from aiohttp import web
from faust.web import Request, Response, View

from cdc.lsn import format_lsn, parse_lsn
from projections.app import ClickHouseAdapter, Progress, Runtime

__all__ = ["register_routes"]

log = logging.getLogger("projections.api")

DEFAULT_TIMEOUT_MS: Final = 2000
MAX_TIMEOUT_MS: Final = 30_000
SQL_MAX_ROWS: Final = 10_000
SQL_TIMEOUT_S: Final = 10.0
_MAX_ID: Final = (1 << 63) - 1


class BadRequest(ValueError):
    """A parameter is malformed; the message says which and what is expected."""


def _json(value: Any, status: int = 200, watermark: int | None = None) -> web.Response:
    headers = {} if watermark is None else {"X-Watermark-LSN": format_lsn(watermark)}
    body = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    watermark = extra.pop("watermark_lsn", None)
    return _json({"error": message, **extra}, status, watermark)


def _id(raw: str, what: str) -> str:
    if not raw.isdigit() or not 0 < int(raw) <= _MAX_ID:
        raise BadRequest(
            f"{what} id {raw[:40]!r} is not valid; expected a positive integer, e.g. /{what}s/42"
        )
    return str(int(raw))


def _date(params: Any, name: str) -> date | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw[:40]!r} is not a date; expected YYYY-MM-DD") from None


def _consistency(params: Any) -> tuple[int | None, float]:
    """(min_lsn, timeout in seconds) from the query string."""
    raw = params.get("min_lsn")
    min_lsn = None
    if raw:
        try:
            min_lsn = parse_lsn(raw)
        except ValueError:
            raise BadRequest(
                f"min_lsn={raw[:40]!r} is not an LSN; expected the writer's token, e.g. 16/B374D848"
            ) from None
    raw_timeout = params.get("timeout_ms")
    timeout_ms = DEFAULT_TIMEOUT_MS
    if raw_timeout:
        if not raw_timeout.isdigit() or int(raw_timeout) > MAX_TIMEOUT_MS:
            raise BadRequest(
                f"timeout_ms={raw_timeout[:20]!r} must be an integer from 0 to {MAX_TIMEOUT_MS}"
            )
        timeout_ms = int(raw_timeout)
    return min_lsn, timeout_ms / 1000


async def _fresh(progress: Progress, min_lsn: int | None, timeout_s: float) -> web.Response | int:
    """The watermark to answer at, or the 504 to send when min_lsn is not reached in time."""
    if min_lsn is not None and not await progress.wait_for(min_lsn, timeout_s):
        wm = progress.watermark()
        return _error(
            504,
            f"the {progress.name} projection has not reached min_lsn {format_lsn(min_lsn)} within "
            f"{timeout_s * 1000:.0f} ms (its watermark is {format_lsn(wm)}); retry, or raise "
            "timeout_ms (at most 30000)",
            projection=progress.name,
            min_lsn=format_lsn(min_lsn),
            watermark=format_lsn(wm),
            watermark_lsn=wm,
        )
    return progress.watermark()


Handler = Callable[[web.Request], Awaitable[web.Response]]
STATUS_PAGE = (Path(__file__).resolve().parent / "static" / "status.html").read_bytes()


def _auth_middleware(token: str | None, runtime: Runtime) -> Any:
    expected = token.encode() if token else None
    requests = runtime.metrics.requests

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        # /health and the status page itself are open; the page's data comes from /status
        if expected is not None and request.path not in ("/health", "/"):
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                requests.labels(name, "401").inc()
                return _error(
                    401, "missing or wrong bearer token; send Authorization: Bearer <API_TOKEN>"
                )
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = _error(400, str(exc))
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason)
        requests.labels(name, str(response.status)).inc()
        return response

    return middleware


def register_routes(app: faust.App, runtime: Runtime) -> None:
    """The query API's views on the Faust app's web server."""
    async def fresh_at(name: str, min_lsn: int | None, timeout_s: float) -> web.Response | int:
        """_fresh() for the projection `name`, or the 503 of a worker that does not run it."""
        why = runtime.not_run(name)
        if why is not None:
            return _error(503, why)
        return await _fresh(runtime.progress(name), min_lsn, timeout_s)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            running = {name: p.running for name, p in runtime.pipelines.items()}
            ok = all(running.values())
            return _json(
                {"status": "ok" if ok else "starting", "pipelines": running}, 200 if ok else 503
            )  # type: ignore[return-value]

    @app.page("/status")
    class Status(View):
        async def get(self, request: Request) -> Response:
            return _json({  # type: ignore[return-value]
                "app_id": runtime.settings.app_id,
                "topics": list(runtime.settings.topics),
                "projections": {name: p.progress.status() for name, p in runtime.pipelines.items()},
                "now": time.time(),
            })  # fmt: skip

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            from projections.metrics import CONTENT_TYPE_LATEST

            return web.Response(  # type: ignore[return-value]
                body=runtime.render_metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

    @app.page("/users/{customer_id}")
    class User(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            cid = _id(customer_id, "user")
            min_lsn, timeout_s = _consistency(request.query)
            fresh = await fresh_at("redis", min_lsn, timeout_s)
            if isinstance(fresh, web.Response):
                return fresh  # type: ignore[return-value]
            view = await runtime.redis.views.user(cid)
            if view is None:
                return _error(
                    404,
                    f"no user {cid} (as of watermark {format_lsn(fresh)})",
                    watermark=format_lsn(fresh),
                    watermark_lsn=fresh,
                )  # type: ignore[return-value]
            view["watermark"] = format_lsn(fresh)
            return _json(view, watermark=fresh)  # type: ignore[return-value]

    @app.page("/orders/{order_id}")
    class Order(View):
        async def get(self, request: Request, order_id: str) -> Response:
            oid = _id(order_id, "order")
            min_lsn, timeout_s = _consistency(request.query)
            fresh = await fresh_at("redis", min_lsn, timeout_s)
            if isinstance(fresh, web.Response):
                return fresh  # type: ignore[return-value]
            view = await runtime.redis.views.order(oid)
            if view is None:
                return _error(
                    404,
                    f"no order {oid} (as of watermark {format_lsn(fresh)})",
                    watermark=format_lsn(fresh),
                    watermark_lsn=fresh,
                )  # type: ignore[return-value]
            view["watermark"] = format_lsn(fresh)
            return _json(view, watermark=fresh)  # type: ignore[return-value]

    async def _analytics(
        request: Request, run: Callable[[ClickHouseAdapter], Awaitable[Any]]
    ) -> web.Response:
        from projections.analytics import AnalyticsError
        from projections.clickhouse_backend import BackendError

        min_lsn, timeout_s = _consistency(request.query)
        fresh = await fresh_at("clickhouse", min_lsn, timeout_s)
        if isinstance(fresh, web.Response):
            return fresh
        assert runtime.clickhouse is not None  # it runs the projection
        try:
            result = await run(runtime.clickhouse)
        except AnalyticsError as exc:
            return _error(400, str(exc), watermark=format_lsn(fresh), watermark_lsn=fresh)
        except BackendError as exc:
            log.error("analytics query failed: %s", exc)
            return _error(
                502, f"ClickHouse could not answer: {str(exc)[:500]}", watermark_lsn=fresh
            )
        return _json({"watermark": format_lsn(fresh), **result}, watermark=fresh)

    @app.page("/analytics/revenue")
    class Revenue(View):
        async def get(self, request: Request) -> Response:
            q = request.query
            start, end = _date(q, "from"), _date(q, "to")
            if start is None or end is None:
                raise BadRequest(
                    "from and to are required dates (YYYY-MM-DD), e.g. ?from=2026-11-01&to=2026-11-30"
                )
            group_by = q.get("group_by") or "day"
            if group_by not in ("day", "product", "category"):
                raise BadRequest(f"group_by={group_by[:20]!r}; expected day, product or category")

            async def run(ch: ClickHouseAdapter) -> dict[str, Any]:
                rows = await ch.query(ch.sink.revenue, start, end, group_by)
                return {
                    "from": start.isoformat(),
                    "to": end.isoformat(),
                    "group_by": group_by,
                    "rows": rows,
                }

            return await _analytics(request, run)  # type: ignore[return-value]

    @app.page("/analytics/funnel")
    class Funnel(View):
        async def get(self, request: Request) -> Response:
            start, end = _date(request.query, "from"), _date(request.query, "to")

            async def run(ch: ClickHouseAdapter) -> dict[str, Any]:
                result: dict[str, Any] = await ch.query(ch.sink.funnel, start, end)
                return result

            return await _analytics(request, run)  # type: ignore[return-value]

    @app.page("/analytics/sql")
    class Sql(View):
        async def post(self, request: Request) -> Response:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise BadRequest('the body must be JSON: {"sql": "SELECT ..."}') from None
            if (
                not isinstance(body, dict)
                or not isinstance(body.get("sql"), str)
                or not body["sql"].strip()
            ):
                raise BadRequest('the body must be a JSON object with "sql": a SELECT statement')
            max_rows = body.get("max_rows", SQL_MAX_ROWS)
            if (
                not isinstance(max_rows, int)
                or isinstance(max_rows, bool)
                or not 0 < max_rows <= SQL_MAX_ROWS
            ):
                raise BadRequest(f"max_rows must be an integer from 1 to {SQL_MAX_ROWS}")
            sql = body["sql"]

            async def run(ch: ClickHouseAdapter) -> dict[str, Any]:
                columns, rows = await ch.query(ch.sink.readonly_query, sql, max_rows, SQL_TIMEOUT_S)
                return {"columns": list(columns), "rows": rows, "row_count": len(rows)}

            return await _analytics(request, run)  # type: ignore[return-value]

    from projections.snapshots import (
        SnapshotError,
        SnapshotStore,
        create_snapshot,
        restore_snapshot,
    )

    snapshots = SnapshotStore(runtime.settings.data_dir / "snapshots")

    @app.page("/admin/snapshots")
    class Snapshots(View):
        async def get(self, request: Request) -> Response:
            return _json({"snapshots": snapshots.list()})  # type: ignore[return-value]

        async def post(self, request: Request) -> Response:
            try:
                return _json(await create_snapshot(runtime, snapshots), 201)  # type: ignore[return-value]
            except SnapshotError as exc:
                return _error(400, str(exc))  # type: ignore[return-value]
            except RedisProcessError as exc:
                return _error(503, str(exc))  # type: ignore[return-value]

    @app.page("/admin/snapshots/{snapshot_id}/restore")
    class RestoreSnapshot(View):
        async def post(self, request: Request, snapshot_id: str) -> Response:
            try:
                return _json(await restore_snapshot(runtime, snapshots, snapshot_id))  # type: ignore[return-value]
            except SnapshotError as exc:
                return _error(404 if "no snapshot" in str(exc) else 400, str(exc))  # type: ignore[return-value]
            except RedisProcessError as exc:
                return _error(503, str(exc))  # type: ignore[return-value]

    from projections.rebuild import Rebuilder
    from projections.redis_process import RedisProcessError

    rebuilder = Rebuilder(runtime)

    @app.page("/admin/rebuild")
    class Rebuild(View):
        async def get(self, request: Request) -> Response:
            if rebuilder.state is None:
                return _error(404, "no rebuild has run in this worker")  # type: ignore[return-value]
            return _json(rebuilder.state.view())  # type: ignore[return-value]

        async def post(self, request: Request) -> Response:
            try:
                body = await request.json()
            except Exception:
                body = None
            if not isinstance(body, dict):
                return _error(400, 'send JSON {"projections": ["redis", "clickhouse"], "source": "topics" | "snapshot"}')  # type: ignore[return-value]
            names = body.get("projections")
            if names == "all" or names == ["all"]:
                names = sorted(runtime.pipelines)
            try:
                state = rebuilder.start(list(names or ()), str(body.get("source", "topics")))
            except (ValueError, RuntimeError) as exc:
                return _error(409 if isinstance(exc, RuntimeError) else 400, str(exc))  # type: ignore[return-value]
            return _json(state.view(), 202)  # type: ignore[return-value]

    # Faust mounts its own index page at "/" (production_index); ours replaces it
    from faust.web.base import BlueprintManager

    faust_web = app.web
    faust_web.production_blueprints = []  # type: ignore[misc]
    faust_web.blueprints = BlueprintManager(faust_web._enabled_blueprints())

    @app.page("/")
    class StatusPage(View):
        """Live lag and throughput charts (static HTML; it reads /status, passing ?token=)."""

        async def get(self, request: Request) -> Response:
            return web.Response(body=STATUS_PAGE, content_type="text/html", charset="utf-8")  # type: ignore[return-value]

    web_app: web.Application = app.web.web_app  # type: ignore[attr-defined]  # the aiohttp driver's
    web_app.middlewares.append(_auth_middleware(runtime.settings.api_token, runtime))
