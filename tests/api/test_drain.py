"""SIGTERM drains a real server: /readyz answers 503 draining at once, new uploads are sent
elsewhere, the requests in progress finish, a client dripping its body does not hold the
exit past the shutdown timeout, and the process exits. Before: /readyz never said draining
and one dripping client delayed the shutdown without limit."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from tests.api.conftest import phantom_bytes
from tests.api.live import live_server, read_response, request_head

SHUTDOWN_S = 4.0


def test_sigterm_drains_then_exits() -> None:
    png = phantom_bytes("all-findings.png")
    with live_server(max_concurrency="1", max_queue="8", body_timeout_s="60",
                     shutdown_timeout_s=str(SHUTDOWN_S)) as live:
        answers: list[int] = []

        def explain() -> None:
            with live.connect() as s:
                s.sendall(request_head("POST", "/explain?methods=gradcam,crm,guided_gradcam,"
                                       "fixations&classes=0,1,2,3", {
                                           "content-type": "image/png",
                                           "content-length": str(len(png))}) + png)
                answers.append(read_response(s)[0])

        dripper = live.connect()
        dripper.sendall(request_head("POST", "/predict", {"content-type": "image/png",
                                                          "content-length": "1000"}))
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                try:
                    dripper.sendall(b"\0")
                except OSError:
                    return
                stop.wait(1.0)

        dripping = threading.Thread(target=drip)
        dripping.start()
        workers = [threading.Thread(target=explain) for _ in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)  # the explanations are queued or computing
        os.kill(live.pid, signal.SIGTERM)
        killed = time.monotonic()

        status, _, body = live.get("/readyz")
        assert (status, json.loads(body)) == (503, {"status": "draining"})
        assert live.get("/healthz")[0] == 200  # alive: no restart while it drains
        with live.connect() as s:
            s.sendall(request_head("POST", "/predict", {"content-type": "image/png",
                                                        "content-length": str(len(png))}))
            status, headers, body = read_response(s)
        assert status == 503 and json.loads(body)["code"] == "draining"
        assert headers["connection"] == "close" and "retry-after" in headers

        for w in workers:
            w.join(timeout=60)
        assert answers == [200, 200, 200, 200]
        live.process.wait(timeout=SHUTDOWN_S + 10)
        exited = time.monotonic() - killed
        stop.set()
        dripping.join()
        dripper.close()
        # The dripping upload held the drain until the timeout, and no longer.
        assert SHUTDOWN_S * 0.9 <= exited < SHUTDOWN_S + 5, exited
        assert live.process.returncode in (0, -signal.SIGTERM)
