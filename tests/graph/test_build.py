"""The compiler's graphs by capability: the rarely used ones decided at compile time and
assembled at their first lookup."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from service.errors import CompileError
from service.graph import autodiff
from service.graph import fixations as fixation_plan
from service.graph.build import (
    GUIDED_PREFIX,
    RARELY_USED,
    Capability,
    Graphs,
    compile_model,
)
from service.models.spec import Layout
from service.runtime.sessions import make_session
from tests import handmade
from tests.handmade import TARGET

EAGER = frozenset(Capability) - RARELY_USED


@pytest.mark.parametrize("name", ["linear", "nhwc"])
def test_rarely_used_graphs_are_assembled_at_their_first_lookup_as_built_at_once(
        name: str) -> None:
    h = handmade.build(name)
    compiled = compile_model(h.model, layout=Layout(h.layout), target_layer=TARGET)
    graphs = compiled.graphs
    assert isinstance(graphs, Graphs)
    assert set(graphs) == set(Capability) and len(graphs) == len(Capability)
    assert compiled.missing(Capability) == {}
    assert graphs.assembled == EAGER  # membership and the plan asked for nothing more
    assert compiled.fixations_plan is not None
    split = compiled.split
    at_once = {
        Capability.GUIDED: autodiff.vjp(compiled.backbone, split.logits, [split.image],
                                        guided=True, prefix=GUIDED_PREFIX),
        Capability.FIXATIONS: fixation_plan.expose(h.model, compiled.fixations_plan,
                                                      split.target),
    }
    for cap, graph in at_once.items():
        assert graphs[cap].SerializeToString() == graph.SerializeToString()
        assert graphs[cap] is graphs[cap]  # assembled once
    assert graphs.assembled == frozenset(Capability)


def test_a_backbone_op_without_a_guided_rule_is_named_before_anything_is_assembled() -> None:
    """``linear`` with a Softplus after the convolution: no VJP rule covers it, CNN
    Fixations passes through it."""
    model = handmade.build("linear").model
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.output[0] = "conv_raw"
    model.graph.node.insert(1, helper.make_node("Softplus", ["conv_raw"], ["conv"],
                                                name="the_softplus"))
    compiled = compile_model(model, target_layer=TARGET)
    assert set(compiled.graphs) == EAGER | {Capability.FIXATIONS}
    assert compiled.graphs.assembled == EAGER  # type: ignore[attr-defined]
    assert compiled.missing(Capability) == {Capability.GUIDED: compiled.errors[Capability.GUIDED]}
    assert compiled.errors[Capability.GUIDED].startswith(
        "no gradient rule for op type(s) Softplus; nodes: Softplus (the_softplus). "
        "Supported ops: ")


def test_a_deferred_graph_the_checker_rejects_fails_at_every_lookup_assembled_once() -> None:
    compiled = compile_model(handmade.build("linear").model, target_layer=TARGET)
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.guided)  # type: ignore[arg-type]
    broken.graph.node[0].input[0] = "nowhere"  # read before anything writes it
    calls: list[int] = []

    def assemble() -> onnx.ModelProto:
        calls.append(1)
        return broken

    graphs = Graphs({Capability.BACKBONE: lambda: compiled.backbone,
                     Capability.HEAD: lambda: compiled.head, Capability.GUIDED: assemble},
                    deferred=[Capability.GUIDED])
    assert Capability.GUIDED in graphs and calls == []
    errors: list[BaseException] = []

    def look_up() -> None:
        try:
            graphs[Capability.GUIDED]
        except CompileError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=look_up) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(errors) == 3 and len({id(e) for e in errors}) == 1
    assert str(errors[0]).startswith("the generated guided graph is invalid: ")
    assert "nowhere" in str(errors[0])
    assert Capability.GUIDED in graphs and graphs.assembled == {Capability.BACKBONE,
                                                                Capability.HEAD}
    with pytest.raises(KeyError):
        graphs[Capability.FIXATIONS]


def test_a_released_deferred_graph_is_assembled_again_at_its_next_lookup() -> None:
    compiled = compile_model(handmade.build("linear").model, target_layer=TARGET)
    first = compiled.graphs[Capability.GUIDED]
    graphs = compiled.graphs
    assert isinstance(graphs, Graphs) and Capability.GUIDED in graphs.assembled
    graphs.release(Capability.GUIDED)
    graphs.release(Capability.BACKBONE)  # not deferred: kept
    assert graphs.assembled == EAGER and Capability.GUIDED in graphs
    again = graphs[Capability.GUIDED]
    assert again is not first and again.SerializeToString() == first.SerializeToString()
    assert Capability.GUIDED in graphs.assembled


def test_an_eager_graph_the_checker_rejects_fails_the_compilation() -> None:
    compiled = compile_model(handmade.build("linear").model, target_layer=TARGET)
    broken = onnx.ModelProto()
    broken.CopyFrom(compiled.head)
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(CompileError, match="^the generated head graph is invalid: .*nowhere"):
        Graphs({Capability.BACKBONE: lambda: compiled.backbone,
                Capability.HEAD: lambda: broken}, deferred=RARELY_USED)


@pytest.mark.parametrize(("name", "opset"), [("linear", 17), ("mlp", 17), ("nhwc", 17),
                                             ("bn_softmax", 17), ("bn_softmax", 18)])
def test_pooled_head_starts_at_the_heads_spatial_mean(name: str, opset: int) -> None:
    """GlobalAveragePool (NCHW) and ReduceMean over the spatial axes (NHWC, keepdims 0) start
    a pooled head, which maps the mean to the head's logits; a head that reads the
    activations through anything else (BatchNormalization first) has none, and says why."""
    h = handmade.build(name, opset=opset)
    compiled = compile_model(h.model, layout=Layout(h.layout), target_layer=TARGET)
    if name == "bn_softmax":
        assert Capability.POOLED_HEAD not in compiled.graphs
        assert "BatchNormalization" in compiled.errors[Capability.POOLED_HEAD]
        return
    graph = compiled.graphs[Capability.POOLED_HEAD]
    assert [i.name for i in graph.graph.input] == ["gap"]
    acts = np.random.default_rng(5).normal(size=(4, handmade.C, handmade.H, handmade.W))
    means = acts.mean(axis=(2, 3)).reshape(4, *[d.dim_value for d in
                                                graph.graph.input[0].type.tensor_type.shape.dim[1:]])
    session = make_session(graph, ["CPUExecutionProvider"], 1)
    (logits,) = session.run([compiled.split.logits], {"gap": means.astype(np.float32)})
    np.testing.assert_allclose(logits, h.numpy_head(acts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("op", "attrs", "pooled"), [
    ("GlobalAveragePool", {}, True),
    ("ReduceMean", {"axes": [2, 3], "keepdims": 1}, True),
    ("ReduceMean", {"axes": [-1, -2], "keepdims": 0}, True),
    ("ReduceMean", {"axes": [1, 2, 3], "keepdims": 0}, False),
    ("ReduceMean", {"axes": [3], "keepdims": 1}, False),
    ("ReduceMax", {"axes": [2, 3], "keepdims": 0}, False),
    ("GlobalMaxPool", {}, False),
])
@pytest.mark.parametrize("opset", [17, 18])
def test_only_a_mean_over_exactly_the_spatial_axes_starts_a_pooled_head(
        op: str, attrs: dict[str, object], pooled: bool, opset: int) -> None:
    """image → Conv → Relu (target) → ``op`` → Flatten → ReduceSum: the pooled head exists
    for a mean over H and W only, its axes an attribute (opset 17) or an input (18)."""
    rng = np.random.default_rng(0)
    attrs = dict(attrs)
    inputs = [TARGET]
    if opset >= 18 and "axes" in attrs:
        inputs.append("axes")
    axes = np.array(attrs.pop("axes") if len(inputs) > 1 else [0], dtype=np.int64)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], [TARGET]),
         helper.make_node(op, inputs, ["pool"], **attrs),
         helper.make_node("Flatten", ["pool"], ["flat"]),
         helper.make_node("ReduceSum", ["flat", "one"], ["scores"], keepdims=1)],
        "g", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 2, 5, 4])],
        [helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.normal(size=(6, 2, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
         numpy_helper.from_array(axes, "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    compiled = compile_model(model, layout=Layout.NCHW, target_layer=TARGET,
                             input_shape=(1, 2, 5, 4))
    assert (Capability.POOLED_HEAD in compiled.graphs) is pooled
    if not pooled:
        error = compiled.errors[Capability.POOLED_HEAD]
        assert "spatial mean" in error and f"with {op}" in error
