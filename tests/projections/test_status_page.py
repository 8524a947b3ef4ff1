"""The status page (GET /) in headless Chromium: its charts show live data."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)")
def test_the_status_page_charts_show_lag_and_throughput(
    event_topics: Any, shop_history: Any, worker_factory: Any, tmp_path: Path
) -> None:
    worker = worker_factory(event_topics.prefix, f"test:{uuid.uuid4().hex[:8]}")
    worker.start()
    stop = threading.Event()

    def traffic() -> None:
        oid = 1
        lsn = 0x2_0000_0000
        while not stop.is_set():
            events = shop_history.register(oid, f"u{oid}@example.com") + shop_history.place(oid, oid)
            lsn += 0x1000
            event_topics.publish(events, watermark=lsn)
            oid += 1
            time.sleep(0.2)

    writer = threading.Thread(target=traffic)
    writer.start()
    try:
        time.sleep(2)
        page = subprocess.run(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=6000", "--dump-dom",
                f"{worker.url}/",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        stop.set()
        writer.join()
    assert page.returncode == 0, page.stderr[-2000:]
    dom = page.stdout
    points = {m.group(1): int(m.group(2)) for m in re.finditer(r'<canvas id="(\w+)" data-points="(\d+)"', dom)}
    assert points.get("lag", 0) >= 4, f"lag chart has no data: {points}"
    assert points.get("rate", 0) >= 2, f"throughput chart has no data: {points}"
    assert "<td>redis</td>" in dom and "<td>clickhouse</td>" in dom
    assert 'id="error" class="err"></span>' in dom, "the page reported an error"
