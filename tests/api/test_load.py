"""A bounded load test on a real server: 2,000 /predict requests from 16 kept-alive
connections on loopback, every one answered 200, and the server's RSS flat between the
second and the last quarter (what grows past the warm-up would be a leak).

A warm-up of 500 requests comes first: until batches of every size have run and the
allocator holds the freed memory it keeps for reuse, RSS climbs by some tens of MiB and
levels off (measured over 6,000 requests: 335 MiB at 500, 361 at 1,500-2,500, 383 from
4,500 on)."""

from __future__ import annotations

import http.client
import threading

from tests.api.conftest import small_phantom_png
from tests.api.live import live_server

REQUESTS = 2000
WARM_UP = 500
CLIENTS = 16


def test_two_thousand_requests_no_error_flat_memory() -> None:
    png = small_phantom_png("all-findings.png")
    # Room for every client in the queue: under this load no answer may be a 503.
    with live_server(max_concurrency="2", max_queue=str(CLIENTS)) as live:
        lock = threading.Lock()
        claimed = done = -WARM_UP  # the warm-up's requests count below zero
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
                        done += 1
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                        if done > 0 and done % (REQUESTS // 4) == 0:
                            rss_kib[done // (REQUESTS // 4)] = live.memory_kib("VmRSS")
            finally:
                conn.close()

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert statuses == {200: WARM_UP + REQUESTS}
        growth = (rss_kib[4] - rss_kib[2]) / rss_kib[2]
        assert growth < 0.10, rss_kib
