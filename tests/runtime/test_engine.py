"""The engine's execution providers: I/O binding, CUDA options and the CPU fallback.

No GPU here: the I/O-binding path is run on CPU (the same calls with device "cpu") and
compared with plain runs; asking for CUDA where it cannot start must run on CPU and say so.
"""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.models.repository import LoadedModel, load_model
from service.runtime.engine import Engine
from service.runtime.sessions import CPU, CUDA, provider_options
from tests.api.conftest import MODELS


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(MODELS / "demo-cxr", providers=[CPU], threads=1, head_batch=256)


def test_io_binding_answers_what_plain_runs_do(demo: LoadedModel) -> None:
    bound = Engine(demo.engine.compiled, [CPU], 1, io_binding=True)
    plain = demo.engine
    x = np.random.default_rng(0).normal(size=(3, 3, 256, 256)).astype(np.float32)
    for a, b in zip(bound.forward(x), plain.forward(x)):
        np.testing.assert_array_equal(a, b)
    seeds = np.eye(4, dtype=np.float32)[[0, 3, 1]]
    for a, b in zip(bound.guided(x, seeds), plain.guided(x, seeds)):
        np.testing.assert_array_equal(a, b)
    acts = plain.forward(x)[0]
    np.testing.assert_array_equal(bound.head_vjp(acts, seeds), plain.head_vjp(acts, seeds))


def test_cuda_options_go_to_the_cuda_provider_only() -> None:
    assert provider_options([CUDA, CPU], "HEURISTIC") == [
        (CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}), CPU]
    assert provider_options([CPU], "EXHAUSTIVE") == [CPU]


def test_cuda_requested_runs_where_it_can_and_says_so() -> None:
    settings = Settings(models=MODELS, threads=1, providers="cuda",
                        cudnn_conv_algo_search="HEURISTIC")
    with TestClient(create_app(settings)) as client:
        info = client.get("/models/demo-cxr").json()
        engine = client.app_state["repository"].models["demo-cxr"].engine  # type: ignore[attr-defined]
        r = client.post("/predict", content=(MODELS.parent / "tests" / "data" / "phantoms" /
                                             "normal.png").read_bytes(),
                        headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert info["execution_providers"] == engine.providers
    if engine.device == "cuda":  # a machine with a usable GPU
        assert info["execution_fallback"] is None and engine.providers[0] == CUDA
    else:
        assert info["execution_providers"] == [CPU]
        assert info["execution_fallback"] == (
            f"{CUDA} was requested but is not usable here; running on {CPU}")


def test_a_model_running_where_asked_reports_no_fallback(demo: LoadedModel) -> None:
    assert demo.engine.fallback is None and demo.engine.device == "cpu"
