"""The engine's execution providers: I/O binding, CUDA options and the CPU fallback; the
sessions of rarely used graphs, made at their first run.

No GPU here: the I/O-binding path is run on CPU (the same calls with device "cpu") and
compared with plain runs; asking for CUDA where it cannot start must run on CPU and say so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.errors import UnknownMethod
from service.graph.build import RARELY_USED, Capability, Graphs
from service.main import create_app
from service.models.activation import Activation
from service.models.repository import LoadedModel, load_model
from service.runtime import sessions
from service.runtime.engine import Engine
from service.runtime.sessions import CPU, CUDA, provider_options, requested_providers
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


def test_asking_for_cuda_loads_its_libraries_and_logs_what_it_cannot(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    sessions._load_cuda_libraries.cache_clear()
    with caplog.at_level(logging.WARNING, logger=sessions.__name__):
        providers = requested_providers("cuda")
    assert capsys.readouterr().out == ""  # ONNX Runtime's own prints went to the log
    if CUDA not in ort.get_available_providers():  # the CPU package: nothing to load
        assert providers == [CPU] and not caplog.records
        return
    assert providers == [CUDA, CPU]
    from onnxruntime.capi.build_and_package_info import cuda_version
    runtime = f"libcudart.so.{cuda_version.split('.')[0]}"
    try:
        ctypes.CDLL(runtime)  # found by its name if the loading found it anywhere
    except OSError:
        assert [r.getMessage() for r in caplog.records if "Failed to load" in r.getMessage()]
    else:
        assert not [r for r in caplog.records if runtime in r.getMessage()]


def test_numpy_blas_runs_on_one_thread_beside_onnx_runtime(demo: LoadedModel) -> None:
    # Its spinning threads made a forward pass after a matrix product 1.9× slower.
    from threadpoolctl import threadpool_info
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)


def test_a_model_running_where_asked_reports_no_fallback(demo: LoadedModel) -> None:
    assert demo.engine.fallback is None and demo.engine.device == "cpu"


def test_rarely_used_sessions_are_made_at_their_first_run_and_answer_like_eager_ones(
        demo: LoadedModel) -> None:
    compiled = demo.engine.compiled
    lazy = Engine(compiled, [CPU], 1)
    eager = Engine(compiled, [CPU], 1, lazy=())
    assert set(eager._sessions) == set(Capability)
    assert set(lazy._sessions) == set(Capability) - RARELY_USED
    assert lazy.available == eager.available == set(Capability)
    x = np.random.default_rng(4).normal(size=(2, 3, 256, 256)).astype(np.float32)
    seeds = np.eye(4, dtype=np.float32)[[2, 0]]
    # Two first requests at once: one session, made once, both answered.
    answers: list[tuple[np.ndarray, ...]] = []
    threads = [threading.Thread(target=lambda: answers.append(lazy.guided(x, seeds)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 2 and Capability.GUIDED in lazy._sessions
    # The session holds the graph; the compiled model keeps no proto of it (the eager
    # engine released it at its start and the lazy one assembled it again for its session).
    assert Capability.GUIDED not in compiled.graphs.assembled  # type: ignore[attr-defined]
    expected = eager.guided(x, seeds)
    for answer in answers:
        for a, b in zip(answer, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    session = lazy._sessions[Capability.GUIDED]
    lazy.guided(x[:1], seeds[:1])
    assert lazy._sessions[Capability.GUIDED] is session
    got = lazy.all_activations(x[:1]).activations
    want = eager.all_activations(x[:1]).activations
    assert set(got) == set(want) and len(got) > 3
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_a_lazy_graph_onnx_runtime_refuses_is_an_unavailable_method(
        demo: LoadedModel) -> None:
    compiled = demo.engine.compiled
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.guided)
    broken.graph.node[0].op_type = "NoSuchOperator"
    engine = Engine(dataclasses.replace(compiled, graphs={**compiled.graphs,
                                                          Capability.GUIDED: broken}), [CPU], 1)
    x = np.zeros((1, 3, 256, 256), np.float32)
    seeds = np.eye(4, dtype=np.float32)[:1]
    for _ in range(2):  # refused once, remembered: the same answer, no new attempt
        with pytest.raises(UnknownMethod, match="guided-backprop graph cannot be loaded by "
                                                "ONNX Runtime: .*NoSuchOperator"):
            engine.guided(x, seeds)
    assert Capability.GUIDED in engine._refused and Capability.GUIDED not in engine._sessions
    for a, b in zip(engine.forward(x), demo.engine.forward(x), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_lazy_graph_the_checker_rejects_at_its_assembly_is_an_unavailable_method(
        demo: LoadedModel) -> None:
    """The compiler decided the graph can be built; its assembly, at the first run, fails
    the checker (a compiler fault): the methods needing it refuse with that reason, once
    tried, and the model serves the others."""
    compiled = demo.engine.compiled
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.fixations)  # type: ignore[arg-type]
    broken.graph.node[0].input[0] = "nowhere"
    calls: list[int] = []

    def assemble() -> onnx.ModelProto:
        calls.append(1)
        return broken

    graphs = Graphs({**{cap: (lambda g=compiled.graphs[cap]: g) for cap in compiled.graphs},
                     Capability.FIXATIONS: assemble}, deferred=RARELY_USED)
    engine = Engine(dataclasses.replace(compiled, graphs=graphs), [CPU], 1)
    assert engine.has_fixations and calls == []
    x = np.zeros((1, 3, 256, 256), np.float32)
    # A fixations request's forward pass falls back to the backbone; the method refuses.
    captures = engine.capture(x, Activation.SIGMOID, fixations=[0])
    for a, b in zip((captures.activations, captures.logits), demo.engine.forward(x),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for _ in range(2):
        with pytest.raises(UnknownMethod, match="^this model's CNN Fixations plan cannot be "
                                                "built: the generated fixations graph is "
                                                "invalid: .*nowhere"):
            engine.all_activations(x)
    assert calls == [1] and Capability.FIXATIONS in engine._refused
    seeds = np.eye(4, dtype=np.float32)[:1]
    for a, b in zip(engine.guided(x, seeds), demo.engine.guided(x, seeds), strict=True):
        np.testing.assert_array_equal(a, b)
