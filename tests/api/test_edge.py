"""Regression tests for the HTTP edge, on a real server: uploads admitted before their body
is read (bounded memory, 503 beyond the budget), multipart parsed off the event loop, slow
and silent clients cut off by the timeouts, and no draining of a body after a 413.

The numbers in the comments are what the service did before these bounds existed (a
security review, and tools/edge_attacks.py on the same machine)."""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator

import pytest

from tests.api import attacks
from tests.api.conftest import metric_sum, small_phantom_png
from tests.api.live import Live, closed_by_peer, live_server, read_response, request_head

TIMEOUT_S = 1.0  # every timeout of this server, small so that the test is fast


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with live_server(max_concurrency="1", max_queue="2", header_timeout_s=str(TIMEOUT_S),
                     body_timeout_s=str(TIMEOUT_S), keep_alive_timeout_s=str(TIMEOUT_S),
                     max_inflight_bytes=str(160 * attacks.MIB)) as server:
        yield server


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_concurrent_big_uploads_are_bounded_before_their_bodies(live: Live,
                                                                 multipart: bool) -> None:
    # 16 uploads of 60 MB with room for 3 requests (and 160 MiB) in flight: before, every
    # body was read first, peaking at 1.2-1.3 GB over the idle process.
    result = attacks.concurrent_uploads(live, clients=16, size=60 * attacks.MIB,
                                        multipart=multipart)
    assert set(result.statuses) <= {400, 503}, result.statuses  # 400: zeros are no image
    assert result.statuses[503] >= 10, result.statuses
    assert result.retry_after == result.statuses[503]
    assert result.growth_mib < 600, result


def test_compressed_uploads_are_counted_at_what_they_may_inflate_to() -> None:
    # 16 gzip uploads of 60 kB that inflate to 60 MB each, with room for 16 requests but
    # 160 MiB in flight. Counted at their length, all 16 were admitted and inflated at once:
    # the server grew by 1,632 MiB on /v2/models/demo-cxr/infer (1,657 on KServe V1's
    # route; /predict did not inflate then). Counted at the 64 MiB upload cap: two at a
    # time, +230 MiB.
    with live_server(max_concurrency="1", max_queue="15",
                     max_inflight_bytes=str(160 * attacks.MIB)) as server:
        for path in ("/predict", "/v2/models/demo-cxr/infer"):
            result = attacks.concurrent_uploads(server, clients=16, gzipped=True, path=path)
            assert set(result.statuses) <= {400, 503}, (path, result.statuses)  # not images
            assert result.statuses[503] >= 10, (path, result.statuses)
            assert result.retry_after == result.statuses[503]
            assert result.growth_mib < 400, (path, result)


def test_many_empty_parts_do_not_stall_the_event_loop(live: Live) -> None:
    # 57 MB of empty parts: before, /healthz took 7.8 s (30 s and more here).
    result = attacks.empty_parts(live, size=57 * attacks.MIB)
    assert result.upload_status == 400
    assert result.healthz_count >= 1
    assert result.healthz_max_s < 1.0, result


def test_slow_request_heads_are_cut_off(live: Live) -> None:
    # 20 clients dripping their headers at 1 byte/s: before, all kept as long as they went on.
    lifetimes = attacks.slow_heads(live, clients=20, wait=10.0)
    assert len(lifetimes) == 20
    assert max(lifetimes) < TIMEOUT_S + 2.0, lifetimes
    assert min(lifetimes) >= TIMEOUT_S * 0.9, lifetimes


def test_a_slow_head_gets_a_408_problem(live: Live) -> None:
    with live.connect() as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # the head never ends
        status, headers, body = read_response(s)
    assert status == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert json.loads(body)["code"] == "header_timeout"


def test_a_silent_connection_is_closed(live: Live) -> None:
    assert TIMEOUT_S * 0.9 <= attacks.silent_connection(live, wait=10.0) < TIMEOUT_S + 2.0


def test_an_idle_kept_alive_connection_is_closed(live: Live) -> None:
    assert TIMEOUT_S * 0.9 <= attacks.idle_keep_alive(live, wait=10.0) < TIMEOUT_S + 2.0


def test_a_slow_body_gets_408(live: Live) -> None:
    status, seconds = attacks.slow_body(live, wait=10.0)
    assert status == 408
    assert seconds < TIMEOUT_S + 3.0


def test_the_connection_closes_after_a_413(live: Live) -> None:
    # Declared 3 GB: before, the server answered 413 and then read all it was sent.
    status, taken, _ = attacks.after_too_large(live, declared=3 * 10**9,
                                               budget=256 * attacks.MIB)
    assert status == 413
    assert taken < 32 * attacks.MIB, taken  # what the kernel's buffers hold, no more


def test_answers_carry_no_server_banner_and_the_security_headers(live: Live) -> None:
    status, headers, _ = live.get("/healthz")
    assert status == 200
    assert "server" not in headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"


def test_a_chunked_body_past_the_cap_gets_413_and_the_connection_closes(live: Live) -> None:
    # No Content-Length: admitted at the cap's worth of bytes, refused as it passes the cap.
    with live.connect() as s:
        s.sendall(request_head("POST", "/predict", {"content-type": "application/dicom",
                                                     "transfer-encoding": "chunked"}))
        chunk = b"%x\r\n%s\r\n" % (attacks.MIB, b"\0" * attacks.MIB)
        sent = 0
        while not select.select([s], [], [], 0)[0] and sent < 128 * attacks.MIB:
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += attacks.MIB
        status, headers, _ = read_response(s)
        assert status == 413 and headers["connection"] == "close"
        assert 64 * attacks.MIB <= sent < 100 * attacks.MIB
        assert closed_by_peer(s, 5.0)


def test_requests_whose_clients_left_are_not_computed() -> None:
    """Clients that send an /explain and go away before the answer (a timeout, a load
    generator stopping): their queued work is dropped, their admission places are given
    back (the next client gets no 503), and the metrics count them as 499. Before, each was
    computed for nobody, ahead of the next client, holding its place meanwhile.

    The compute stream waits up to 2 s for batch-mates here, so the eight are still queued
    when their clients close (0.3 s after sending, once their bodies have been read: a
    close before that is uvicorn's, a 400 for a body that never came)."""
    png = small_phantom_png("all-findings.png")
    abandoned = 8
    head = request_head("POST", "/explain", {"content-type": "image/png",
                                             "content-length": str(len(png))})
    with live_server(max_concurrency="1", max_queue=str(abandoned), max_batch_size="16",
                     max_queue_delay_ms="2000") as live:
        sockets = [live.connect() for _ in range(abandoned)]
        for s in sockets:
            s.sendall(head + png)
        time.sleep(0.3)
        for s in sockets:
            s.close()
        deadline = time.monotonic() + 30
        while metric_sum(live.get("/metrics")[2].decode(), "medexplain_http_requests_total",
                       code="499") < abandoned and time.monotonic() < deadline:
            time.sleep(0.05)
        # 1 + 8 admitted places: a ninth request gets one only if the eight gave theirs back.
        with live.connect() as s:
            s.sendall(head + png)
            status, _, _ = read_response(s)
        assert status == 200
        text = live.get("/metrics")[2].decode()
    assert metric_sum(text, "medexplain_http_requests_total", code="499",
                    handler="/explain") == abandoned
    assert metric_sum(text, "medexplain_inference_count_total") == 1  # the ninth alone


def test_a_client_gone_before_its_whole_body_counts_as_499(live: Live) -> None:
    png = small_phantom_png("all-findings.png")
    before = metric_sum(live.get("/metrics")[2].decode(), "medexplain_http_requests_total",
                      code="499", handler="/explain")
    with live.connect() as s:
        s.sendall(request_head("POST", "/explain", {"content-type": "image/png",
                                                    "content-length": str(len(png))})
                  + png[:len(png) // 2])
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while (after := metric_sum(live.get("/metrics")[2].decode(),
                             "medexplain_http_requests_total", code="499",
                             handler="/explain")) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == before + 1
