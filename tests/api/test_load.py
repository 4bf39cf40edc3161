"""A bounded load test on a real server: 2,000 /predict requests from 16 kept-alive
connections on loopback, every one answered 200, and the server's RSS flat between the
second and the last quarter (what grows past the warm-up would be a leak)."""

from __future__ import annotations

import http.client
import threading

import cv2
import numpy as np

from tests.api.conftest import phantom_bytes
from tests.api.live import live_server

REQUESTS = 2000
CLIENTS = 16


def _small_phantom() -> bytes:
    grey = cv2.imdecode(np.frombuffer(phantom_bytes("all-findings.png"), np.uint8),
                        cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA))
    assert ok
    return png.tobytes()


def test_two_thousand_requests_no_error_flat_memory() -> None:
    png = _small_phantom()
    # Room for every client in the queue: under this load no answer may be a 503.
    with live_server(max_concurrency="2", max_queue=str(CLIENTS)) as live:
        lock = threading.Lock()
        claimed = done = 0
        statuses: dict[int, int] = {}
        rss_kib: dict[int, int] = {}  # quarter → the server's RSS when it was complete

        def client() -> None:
            nonlocal claimed, done
            conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
            try:
                while True:
                    with lock:
                        if claimed == REQUESTS:
                            return
                        claimed += 1
                    conn.request("POST", "/predict", body=png,
                                 headers={"content-type": "image/png"})
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                        done += 1
                        if done % (REQUESTS // 4) == 0:
                            rss_kib[done // (REQUESTS // 4)] = live.memory_kib("VmRSS")
            finally:
                conn.close()

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert statuses == {200: REQUESTS}
        growth = (rss_kib[4] - rss_kib[2]) / rss_kib[2]
        assert growth < 0.10, rss_kib
