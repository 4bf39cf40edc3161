"""The compute stream: batches, bounds, per-request errors, metrics; and the HTTP edge."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import pipeline
from service.config import Settings
from service.errors import Overloaded, UnknownLabel
from service.main import create_app
from service.models.repository import LoadedModel, load_model
from service.runtime.worker import ComputeStream
from tests.api.conftest import MODELS, assert_problem, phantom_bytes
from tests.api.test_explain import _npy
from tests.runtime.test_batching import IMAGES, TOL, _assert_same, _job, _options, bad_input


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(MODELS / "demo-cxr", providers=["CPUExecutionProvider"], threads=1,
                      head_batch=256)


class Gate:
    """An execute function that holds each batch until released and records batch sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, model: str, payloads: Sequence[Any]) -> list[Any]:
        self.sizes.append(len(payloads))
        self.entered.set()
        assert self.release.wait(10)
        return [p * 2 for p in payloads]


def test_queued_requests_compute_together_up_to_the_batch_size() -> None:
    gate = Gate()
    stream = ComputeStream(gate, max_batch_size=3, max_queue_delay_ms=0, capacity=16).start()
    try:
        first = stream.submit("m", 1)
        assert gate.entered.wait(10)  # the first batch runs alone: nothing else was queued
        rest = [stream.submit("m", k) for k in range(2, 9)]
        gate.release.set()
        assert [f.result(10) for f in [first, *rest]] == [2 * k for k in range(1, 9)]
        assert gate.sizes == [1, 3, 3, 1]
    finally:
        stream.close()


def test_a_queue_delay_waits_for_batch_mates() -> None:
    gate = Gate()
    gate.release.set()
    stream = ComputeStream(gate, max_batch_size=4, max_queue_delay_ms=2000, capacity=16).start()
    try:
        futures = [stream.submit("m", k) for k in range(4)]  # a full batch goes at once
        start = time.perf_counter()
        assert [f.result(10) for f in futures] == [0, 2, 4, 6]
        assert time.perf_counter() - start < 1.5
        assert gate.sizes == [4]
    finally:
        stream.close()


def test_a_full_queue_refuses_with_overloaded() -> None:
    gate = Gate()
    stream = ComputeStream(gate, max_batch_size=1, max_queue_delay_ms=0, capacity=2).start()
    try:
        running = stream.submit("m", 0)
        assert gate.entered.wait(10)
        waiting = [stream.submit("m", 1), stream.submit("m", 2)]
        with pytest.raises(Overloaded, match="2 requests for model 'm' are waiting"):
            stream.submit("m", 3)
        stream.submit("other", 4)  # each model has its own queue
        gate.release.set()
        assert running.result(10) == 0 and [f.result(10) for f in waiting] == [2, 4]
    finally:
        stream.close()


def test_a_cancelled_request_leaves_its_batch_or_waits_for_it() -> None:
    """A request cancelled while queued is not computed; one cancelled while its batch
    computes ends only with that batch (what it holds is freed then, not before)."""
    gate = Gate()
    stream = ComputeStream(gate, max_batch_size=1, max_queue_delay_ms=0, capacity=16).start()

    async def scenario() -> None:
        running = asyncio.ensure_future(stream.run("m", 1))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(stream.run("m", 2))
        await asyncio.sleep(0.05)
        queued.cancel()
        running.cancel()
        await asyncio.sleep(0.2)
        # The running one is still waiting for its batch; the queued one is gone.
        assert queued.done() and not running.done()
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await running

    try:
        asyncio.run(scenario())
        assert gate.sizes == [1]  # the queued request never reached the execute function
        assert stream.submit("m", 3).result(10) == 6  # and the stream goes on
    finally:
        stream.close()


def test_errors_reach_only_their_own_requests(demo: LoadedModel) -> None:
    """A job's own error (an unknown class) comes back as its answer; a job that breaks the
    whole batch (ONNX Runtime refuses its tensor) makes the stream compute the batch again
    request by request, so only that job fails."""
    asks = [(IMAGES[0], _options(("gradcam", "guided_backprop"), ["Cardiomegaly"])),
            (IMAGES[1], _options(("crm",), ["no such finding"])),
            (IMAGES[2], _options(("gradcam",))),
            (IMAGES[3], _options(("fixations",), ["1"]))]
    jobs = [_job(demo, *a) for a in asks]
    jobs[2] = bad_input(jobs[2])
    stream = ComputeStream(lambda name, payload: pipeline.compute(demo, payload),
                           max_batch_size=8, max_queue_delay_ms=0, capacity=16)
    # Queue everything before the thread starts, so the four form one batch.
    futures = [stream.submit("demo-cxr", job) for job in jobs]
    stream.start()
    try:
        with pytest.raises(UnknownLabel):
            futures[1].result(60)
        with pytest.raises(Exception) as broken:
            futures[2].result(60)
        assert "INVALID_ARGUMENT" in str(broken.value) or "dimensions" in str(broken.value)
        for k in (0, 3):
            _assert_same(futures[k].result(60), pipeline.compute(demo, [_job(demo, *asks[k])])[0])
    finally:
        stream.close()


def _sample(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


def _post(client: TestClient, image: str) -> dict[str, Any]:
    r = client.post("/explain", content=phantom_bytes(image), headers={
        "content-type": "image/png"}, params={"methods": "gradcam,crm", "classes": "0",
                                               "heatmap": "npy"})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    del body["timings_ms"]
    return body


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as c:
        yield c


def test_http_requests_batch_and_the_metrics_say_so(client: TestClient) -> None:
    """Concurrent requests through the app share batches (a queue delay gathers them), each
    gets the answer it gets alone (``client``: no delay, one request at a time), and
    /metrics shows the batch metrics moving."""
    settings = Settings(models=MODELS, threads=1, max_batch_size=4, max_queue_delay_ms=1000,
                        max_concurrency=4)
    with TestClient(create_app(settings)) as batching:
        before = {n: _sample(f"medexplain_inference_batch_size{n}", "demo-cxr")
                  for n in ("_count", "_sum")}
        queue_before = _sample("medexplain_inference_queue_duration_us_total", "demo-cxr")
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda image: _post(batching, image), IMAGES[:4]))
        text = batching.get("/metrics").text
    assert 'medexplain_inference_batch_size_count{model="demo-cxr"}' in text
    assert "medexplain_inference_compute_infer_duration_us_total" in text
    after = {n: _sample(f"medexplain_inference_batch_size{n}", "demo-cxr")
             for n in ("_count", "_sum")}
    assert after["_sum"] - before["_sum"] == 4
    assert after["_count"] - before["_count"] < 4, "the four requests shared batches"
    assert _sample("medexplain_inference_queue_duration_us_total", "demo-cxr") > queue_before
    for image, body in zip(IMAGES[:4], bodies):
        alone = _post(client, image)
        assert [e["heatmap"]["data"] for e in body["explanations"]] == [
            e["heatmap"]["data"] for e in alone["explanations"]] or _close(body, alone)
        assert body["predictions"] == alone["predictions"]


def _close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Maps equal within the batch tolerance when not bit for bit (see test_batching)."""
    for x, y in zip(a["explanations"], b["explanations"], strict=True):
        u, v = _npy(x["heatmap"]["data"]), _npy(y["heatmap"]["data"])
        np.testing.assert_allclose(u, v, rtol=0, atol=TOL * float(np.abs(v).max()))
    return True


def test_a_closed_stream_answers_503_with_retry_after() -> None:
    with TestClient(create_app(Settings(models=MODELS, threads=1))) as closing:
        closing.app_state["scheduler"].close()  # type: ignore[attr-defined]
        r = closing.post("/predict", content=phantom_bytes(IMAGES[0]),
                         headers={"content-type": "image/png"})
        assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == "1"
