"""SIGTERM drains a real server: /readyz answers 503 draining at once, new uploads are sent
elsewhere, the requests in progress (even mid-body) finish, a client dripping its body does not hold the
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

SHUTDOWN_S = 4.0  # room for the three explanations on a loaded machine


def test_sigterm_drains_then_exits() -> None:
    png = phantom_bytes("all-findings.png")
    with live_server(max_concurrency="1", max_queue="8", body_timeout_s="60",
                     shutdown_timeout_s=str(SHUTDOWN_S)) as live:
        answers: list[tuple[int, float]] = []  # status, when it arrived
        started = threading.Semaphore(0)
        finish = threading.Event()

        def explain() -> None:
            # Half the body before SIGTERM, the rest after: in flight for certain.
            half = len(png) // 2
            with live.connect() as s:
                s.sendall(request_head("POST", "/explain?methods=gradcam,crm,fixations", {
                                           "content-type": "image/png",
                                           "content-length": str(len(png))}) + png[:half])
                started.release()
                finish.wait(30)
                s.sendall(png[half:])
                answers.append((read_response(s)[0], time.monotonic()))

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
        workers = [threading.Thread(target=explain) for _ in range(3)]
        for w in workers:
            w.start()
        for _ in workers:
            started.acquire(timeout=30)
        time.sleep(1.0)  # the server has their headers and reads their bodies
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

        finish.set()
        for w in workers:
            w.join(timeout=60)
        assert [status for status, _ in answers] == [200, 200, 200]
        assert max(at for _, at in answers) > killed  # answered during the drain
        live.process.wait(timeout=SHUTDOWN_S + 10)
        exited = time.monotonic() - killed
        stop.set()
        dripping.join()
        dripper.close()
        # The dripping upload held the drain until the timeout, and no longer.
        assert SHUTDOWN_S * 0.9 <= exited < SHUTDOWN_S + 5, exited
        assert live.process.returncode in (0, -signal.SIGTERM)
