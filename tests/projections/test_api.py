"""The query API: consistency tokens, parameter checking, read-only SQL, bearer token, metrics."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cdc.lsn import format_lsn, parse_lsn

from .conftest import REDIS_URL, EventTopics, ShopHistory, WorkerProcess

TOKEN = "s3cret-" + uuid.uuid4().hex


class Api:
    def __init__(
        self, worker: WorkerProcess, topics: EventTopics, shop: ShopHistory, lsn: int
    ) -> None:
        self.worker, self.topics, self.shop, self.lsn = worker, topics, shop, lsn

    def get(self, path: str) -> tuple[int, dict, dict]:
        return self.worker.get(path, TOKEN)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.worker.post(path, body, TOKEN)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    from confluent_kafka.admin import AdminClient, NewTopic

    from .conftest import KAFKA_BOOTSTRAP

    prefix = f"t{uuid.uuid4().hex[:10]}"
    topics = EventTopics(prefix)
    admin = AdminClient({"bootstrap.servers": KAFKA_BOOTSTRAP})
    for future in admin.create_topics([NewTopic(n, 6, 1) for n in topics.names]).values():
        future.result(30)
    shop = ShopHistory()
    events = shop.register(1) + shop.register(2)
    for oid in range(1, 6):
        events += shop.place(oid, 1, lines=2, price="10.00")
    events += shop.pay(1, 1) + shop.pay(2, 2) + shop.ship(2)
    lsn = shop.lsn + 0x100
    topics.publish(events, watermark=lsn)
    namespace = f"test:{uuid.uuid4().hex}"
    tmp: Path = tmp_path_factory.mktemp("api")
    worker = WorkerProcess(tmp, prefix, namespace, {"API_TOKEN": TOKEN})
    worker.start()
    api = Api(worker, topics, shop, lsn)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, status, _ = api.get("/status")
        if all(p["watermark"] == format_lsn(lsn) for p in status["projections"].values()):
            break
        time.sleep(0.2)
    yield api
    worker.stop()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    for future in admin.delete_topics(topics.names, operation_timeout=30).values():
        future.result(30)  # unwaited, the request may never leave the process


def test_a_user_view_says_which_watermark_it_reflects(api: Api) -> None:
    code, body, headers = api.get("/users/1")
    assert code == 200
    assert headers["X-Watermark-LSN"] == body["watermark"]
    assert parse_lsn(body["watermark"]) >= api.lsn
    assert body["order_counts"]["pending"] == 3 and body["order_counts"]["paid"] == 1
    assert body["order_counts"]["shipped"] == 1 and len(body["recent_orders"]) == 5


def test_an_order_view_has_items_and_status(api: Api) -> None:
    code, body, headers = api.get("/orders/2")
    assert code == 200 and body["status"] == "shipped" and len(body["items"]) == 2
    assert headers["X-Watermark-LSN"] == body["watermark"]


def test_min_lsn_already_reached_answers_at_once(api: Api) -> None:
    start = time.monotonic()
    code, _body, _ = api.get(f"/users/1?min_lsn={format_lsn(api.lsn)}&timeout_ms=5000")
    assert code == 200 and time.monotonic() - start < 1.0


def test_min_lsn_not_reached_is_a_504_with_the_current_watermark(api: Api) -> None:
    ahead = format_lsn(api.lsn + 0x10_0000_0000)
    start = time.monotonic()
    code, body, headers = api.get(f"/users/1?min_lsn={ahead}&timeout_ms=300")
    assert code == 504
    assert 0.25 < time.monotonic() - start < 3
    assert body["min_lsn"] == ahead and body["watermark"] == headers["X-Watermark-LSN"]
    assert parse_lsn(body["watermark"]) < parse_lsn(ahead)
    code, body, _ = api.get(f"/analytics/funnel?min_lsn={ahead}&timeout_ms=100")
    assert code == 504 and body["projection"] == "clickhouse"


def test_a_read_waits_for_the_write_it_names(api: Api) -> None:
    """Read-your-writes: the answer comes once the write is applied, and contains it."""
    shop = api.shop
    events = shop.place(99, 2, lines=1)
    token = shop.lsn + 0x10  # what the writer returned: past the commit

    def publish_later() -> None:
        time.sleep(0.5)
        api.topics.publish(events, watermark=token)

    thread = threading.Thread(target=publish_later)
    thread.start()
    code, body, _ = api.get(f"/orders/99?min_lsn={format_lsn(token)}&timeout_ms=10000")
    thread.join()
    assert code == 200, body
    assert body["status"] == "pending" and parse_lsn(body["watermark"]) >= token
    code, user, _ = api.get(f"/users/2?min_lsn={format_lsn(token)}")
    assert code == 200 and user["order_counts"]["pending"] == 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/users/abc", "not valid; expected a positive integer"),
        ("/users/0", "not valid"),
        ("/users/1%20OR%201=1", "not valid"),
        ("/orders/-5", "not valid"),
        ("/users/1?min_lsn=zzz", "is not an LSN"),
        ("/users/1?min_lsn=1/2/3", "is not an LSN"),
        ("/users/1?timeout_ms=99999", "timeout_ms"),
        ("/users/1?timeout_ms=-1", "timeout_ms"),
        ("/analytics/revenue?to=2026-01-01", "from and to are required"),
        ("/analytics/revenue?from=2026-01-01&to=2026-13-01", "not a date"),
        (
            "/analytics/revenue?from=2026-01-01'%3B%20DROP%20TABLE%20orders--&to=2026-02-01",
            "not a date",
        ),
        ("/analytics/revenue?from=2026-01-01&to=2026-02-01&group_by=status", "group_by"),
        ("/analytics/revenue?from=2026-03-01&to=2026-02-01", "after to"),
    ],
)
def test_bad_parameters_are_400_with_a_message(api: Api, path: str, message: str) -> None:
    code, body, _ = api.get(path)
    assert code == 400, body
    assert message in body["error"]


def test_unknown_ids_are_404(api: Api) -> None:
    code, body, headers = api.get("/users/424242")
    assert code == 404 and "no user 424242" in body["error"] and "X-Watermark-LSN" in headers
    code, body, _ = api.get("/orders/424242")
    assert code == 404
    code, body, _ = api.get("/no/such/route")
    assert code == 404


def test_the_point_reads_answer_other_methods_with_405_in_json(api: Api) -> None:
    for path in ("/users/1", "/orders/1"):
        code, body = api.post(path, {})
        assert code == 405 and "error" in body, (path, code, body)


def test_revenue_and_funnel_answer_from_clickhouse(api: Api) -> None:
    code, body, headers = api.get("/analytics/revenue?from=2020-01-01&to=2030-12-31&group_by=day")
    assert code == 200 and headers["X-Watermark-LSN"] == body["watermark"]
    assert body["group_by"] == "day" and body["rows"]
    code, body, _ = api.get("/analytics/revenue?from=2020-01-01&to=2030-12-31&group_by=category")
    assert code == 200
    code, body, _ = api.get("/analytics/funnel")
    assert code == 200 and body["placed"] >= 5 and body["paid"] >= 2 and body["shipped"] >= 1


def test_sql_endpoint_reads(api: Api) -> None:
    code, body = api.post(
        "/analytics/sql", {"sql": "SELECT count() AS n FROM orders_v WHERE status = 'pending'"}
    )
    assert code == 200, body
    assert body["columns"] == ["n"] and body["rows"][0][0] >= 3


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("DROP TABLE orders", "only reads"),
        ("INSERT INTO orders_v SELECT * FROM orders_v", "only reads"),
        ("SELECT 1; DROP TABLE orders", "exactly one SQL statement"),
        ("SELECT 1 SETTINGS readonly = 0", ""),
    ],
)
def test_sql_endpoint_refuses_writes_and_several_statements(
    api: Api, sql: str, message: str
) -> None:
    code, body = api.post("/analytics/sql", {"sql": sql})
    assert code == 400, body
    assert message in body["error"]
    code, body = api.post("/analytics/sql", {"sql": "SELECT count() FROM orders_v"})
    assert code == 200 and body["rows"][0][0] >= 5  # nothing was dropped


def test_sql_endpoint_checks_its_body(api: Api) -> None:
    assert api.post("/analytics/sql", {"query": "SELECT 1"})[0] == 400
    assert api.post("/analytics/sql", {"sql": "SELECT 1", "max_rows": 10**9})[0] == 400


def test_a_rebuild_of_an_unknown_projection_is_refused_with_the_choices(api: Api) -> None:
    code, body = api.post("/admin/rebuild", {"projections": ["redis", "elastic"]})
    assert code == 400
    assert body["error"] == "unknown projection(s) ['elastic']; use redis, clickhouse or all"
    out = subprocess.run(
        [sys.executable, "-m", "projections", "rebuild", "elastic"],
        env=api.worker.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "rebuild redis|clickhouse|all [--source topics|snapshot]" in out.stderr


def test_every_route_but_health_needs_the_bearer_token(api: Api) -> None:
    worker = api.worker
    assert worker.get("/health")[0] == 200
    for path in ("/users/1", "/orders/1", "/status", "/metrics", "/analytics/funnel"):
        assert worker.get(path)[0] == 401, path
        assert worker.get(path, "wrong-token")[0] == 401, path
    assert worker.post("/analytics/sql", {"sql": "SELECT 1"})[0] == 401


def test_status_reports_watermark_and_lag_per_projection(api: Api) -> None:
    code, body, _ = api.get("/status")
    assert code == 200
    # ClickHouse reads the order, customer and product topics (6 partitions each); the
    # Redis views come from the order and customer topics only
    for name, topics in (
        ("redis", ("customer", "order")),
        ("clickhouse", ("customer", "order", "product")),
    ):
        p = body["projections"][name]
        assert parse_lsn(p["watermark"]) >= api.lsn
        assert p["lag_bytes"] == 0 and p["lag_seconds"] == 0.0
        assert sorted({k.split(".")[-2] for k in p["partitions"]}) == list(topics)
        assert len(p["partitions"]) == 6 * len(topics)


def test_metrics_are_exposed_for_prometheus(api: Api) -> None:
    import urllib.request

    req = urllib.request.Request(
        f"{api.worker.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    assert 'projection_events_total{projection="redis"}' in text
    assert 'projection_watermark_lsn{projection="clickhouse"}' in text
    assert "projection_apply_seconds_bucket" in text and "query_api_requests_total" in text


def test_the_api_binds_loopback_by_default() -> None:
    from projections.config import Settings

    settings = Settings.from_env({})
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 6066)


@pytest.mark.parametrize(
    ("raw", "runs"),
    [
        (None, ("redis", "clickhouse")),
        ("", ("redis", "clickhouse")),
        ("clickhouse", ("clickhouse",)),
        (" clickhouse , redis", ("redis", "clickhouse")),
        ("redis,redis", ("redis",)),
    ],
)
def test_projections_picks_what_a_worker_runs(raw: str | None, runs: tuple[str, ...]) -> None:
    from projections.config import Settings

    env = {} if raw is None else {"PROJECTIONS": raw}
    assert Settings.from_env(env).projections == runs


@pytest.mark.parametrize("raw", ["views", "redis,", "redis;clickhouse"])
def test_an_unknown_projection_is_named(raw: str) -> None:
    from projections.config import ConfigError, Settings

    with pytest.raises(ConfigError, match=r"PROJECTIONS=.*unknown projection.*redis, clickhouse"):
        Settings.from_env({"PROJECTIONS": raw})


@pytest.mark.parametrize(("raw", "loop"), [(None, "uvloop"), ("", "uvloop"), ("asyncio", "asyncio"), (" UVLoop ", "uvloop")])
def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for(raw: str | None, loop: str) -> None:
    from projections.config import Settings

    env = {} if raw is None else {"PROJECTIONS_EVENT_LOOP": raw}
    assert Settings.from_env(env).event_loop == loop


def test_an_unknown_event_loop_is_named() -> None:
    from projections.config import ConfigError, Settings

    with pytest.raises(ConfigError, match=r"PROJECTIONS_EVENT_LOOP='trio' is not an event loop; expected uvloop or asyncio"):
        Settings.from_env({"PROJECTIONS_EVENT_LOOP": "trio"})
