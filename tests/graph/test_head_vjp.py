"""The compiler's cut and its head VJP against NumPy and central finite differences."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from service.errors import CompileError, UnknownMethod
from service.graph.autodiff import SEED, grad_name
from service.graph.build import Capability, compile_model
from service.methods import METHODS, Target, rows
from service.models.activation import Activation
from service.models.spec import Layout
from service.runtime.engine import Engine
from tests import handmade
from tests.handmade import NAMES, TARGET


def _compile(h: handmade.Handmade, **kw: object) -> object:
    return compile_model(h.model, layout=Layout(h.layout), target_layer=TARGET, **kw)


def _native(a: np.ndarray, layout: str) -> np.ndarray:
    return a.transpose(0, 2, 3, 1) if layout == "NHWC" else a


def _fd_jacobian(f: object, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d f(a)[k] / d a, (K, *a.shape), by central differences in float64."""
    out = []
    for i in np.ndindex(a.shape):
        up, down = a.copy(), a.copy()
        up[i] += eps
        down[i] -= eps
        out.append((f(up[None])[0] - f(down[None])[0]) / (2 * eps))  # type: ignore[operator]
    return np.stack(out, axis=-1).reshape(-1, *a.shape)


@pytest.mark.parametrize("name", NAMES)
def test_vjp_float64_equals_finite_differences(name: str, rng: np.random.Generator) -> None:
    h = handmade.build(name, dtype=np.float64)
    compiled = _compile(h)
    acts = np.abs(rng.normal(size=(2, handmade.C, handmade.H, handmade.W)))
    seeds = rng.normal(size=(2, handmade.K))
    evaluator = ReferenceEvaluator(compiled.head_vjp)  # type: ignore[attr-defined]
    (grads,) = evaluator.run([grad_name(TARGET)], {TARGET: _native(acts, h.layout), SEED: seeds})
    if h.layout == "NHWC":
        grads = grads.transpose(0, 3, 1, 2)
    for b in range(2):
        jac = _fd_jacobian(h.numpy_head, acts[b])
        expected = np.tensordot(seeds[b], jac, axes=1)
        np.testing.assert_allclose(grads[b], expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_float32_engine_matches_numpy_head(name: str, rng: np.random.Generator) -> None:
    h = handmade.build(name)
    engine = Engine(_compile(h), ["CPUExecutionProvider"], 1)  # type: ignore[arg-type]
    acts = np.abs(rng.normal(size=(5, handmade.C, handmade.H, handmade.W))).astype(np.float32)
    np.testing.assert_allclose(engine.head(acts), h.numpy_head(acts.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
    seeds = rng.normal(size=(5, handmade.K)).astype(np.float32)
    grads = engine.head_vjp(acts, seeds)
    for b in range(5):
        jac = _fd_jacobian(h.numpy_head, acts[b].astype(np.float64))
        expected = np.tensordot(seeds[b].astype(np.float64), jac, axes=1)
        err = np.abs(grads[b] - expected).max() / np.abs(expected).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def test_head_batches_in_chunks(rng: np.random.Generator) -> None:
    h = handmade.build("mlp")
    engine = Engine(_compile(h), ["CPUExecutionProvider"], 1, max_batch=3)  # type: ignore[arg-type]
    acts = np.abs(rng.normal(size=(7, handmade.C, handmade.H, handmade.W))).astype(np.float32)
    np.testing.assert_allclose(engine.head(acts), h.numpy_head(acts.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "target", "layout", "activation"),
    [
        ("linear", "features", Layout.NCHW, "none"),
        ("mlp", "features", Layout.NCHW, "sigmoid"),
        # The last 4-D activation before pooling is the ReLU after BN, inside the "head".
        ("bn_softmax", "bnr", Layout.NCHW, "softmax"),
        ("nhwc", "features", Layout.NHWC, "sigmoid"),
    ],
)
def test_target_layer_auto_detection(name: str, target: str, layout: Layout,
                                     activation: str) -> None:
    h = handmade.build(name)
    compiled = compile_model(h.model, layout=Layout(h.layout))
    assert compiled.split.target == target
    assert compiled.split.target_layout is layout
    assert compiled.split.target_shape == (handmade.C, handmade.H, handmade.W)
    assert compiled.split.graph_activation == activation
    assert compiled.split.logits == ("scores" if activation == "none" else "logits")


def test_opset_18_reduce_with_axes_input(rng: np.random.Generator) -> None:
    h = handmade.build("bn_softmax", opset=18)
    engine = Engine(_compile(h), ["CPUExecutionProvider"], 1)  # type: ignore[arg-type]
    acts = np.abs(rng.normal(size=(1, handmade.C, handmade.H, handmade.W))).astype(np.float32)
    grads = engine.head_vjp(acts, np.eye(1, handmade.K, dtype=np.float32))
    jac = _fd_jacobian(h.numpy_head, acts[0].astype(np.float64))
    np.testing.assert_allclose(grads[0], jac[0], rtol=1e-4, atol=1e-5)


def test_generated_graphs_pass_the_full_checker() -> None:
    compiled = _compile(handmade.build("mlp"))
    for graph in compiled.graphs.values():  # type: ignore[attr-defined]
        onnx.checker.check_model(graph, full_check=True)
        assert all(n.output[0].startswith("xai/") for n in graph.graph.node
                   if n.name.startswith("xai/"))


def test_activation_mismatch_is_refused() -> None:
    with pytest.raises(CompileError, match="output.activation = 'softmax'.*ends in sigmoid"):
        compile_model(handmade.build("mlp").model, activation="softmax")


def test_unknown_target_layer_is_refused() -> None:
    with pytest.raises(CompileError, match="'nope' is not a tensor of the graph"):
        compile_model(handmade.build("mlp").model, target_layer="nope")


def test_target_layer_that_is_not_a_cut_is_refused() -> None:
    model = handmade.build("linear").model
    graph = model.graph
    # A second path from the image to the scores that goes around the target layer.
    graph.node.extend([
        helper.make_node("GlobalAveragePool", ["image"], ["img_gap"]),
        helper.make_node("ReduceSum", ["img_gap"], ["img_sum"], keepdims=0),
        helper.make_node("Add", ["gemm_out", "img_sum"], ["scores"]),
    ])
    for node in graph.node:
        if node.op_type == "Gemm":
            node.output[0] = "gemm_out"
    with pytest.raises(CompileError, match="does not separate the image from the logits"):
        compile_model(model, target_layer=TARGET)


def test_op_without_rule_is_named() -> None:
    model = handmade.build("linear").model
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.output[0] = "gemm_out"
    model.graph.node.append(helper.make_node("Gelu", ["gemm_out"], ["scores"], name="the_gelu",
                                             domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    compiled = compile_model(model, target_layer=TARGET)
    assert compiled.head_vjp is None
    assert re.fullmatch(r"no gradient rule for op type\(s\) com.microsoft:Gelu; nodes: "
                        r"com.microsoft:Gelu \(the_gelu\)\. Supported ops: .*Gemm.*",
                        str(compiled.head_vjp_error))


def test_head_without_rules_keeps_the_forward_graphs(rng: np.random.Generator) -> None:
    """No head VJP (an op no rule covers): no session for it, the head runs, and Grad-CAM
    refuses with the reason instead of failing inside ONNX Runtime."""
    h = handmade.build("contrib_head")
    compiled = compile_model(h.model)
    assert compiled.head_vjp is None and compiled.guided is None
    assert "com.microsoft:Gelu (fused_gelu)" in str(compiled.head_vjp_error)
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    assert not engine.has_head_vjp and engine.max_batch > 1
    acts = np.abs(rng.normal(size=(3, handmade.C, handmade.H, handmade.W))).astype(np.float32)
    np.testing.assert_allclose(engine.head(acts), h.numpy_head(acts.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(UnknownMethod, match="no head VJP graph"):
        engine.head_vjp(acts, np.eye(3, handmade.K, dtype=np.float32))
    dims = compiled.backbone.graph.input[0].type.tensor_type.shape.dim
    image = rng.normal(size=[d.dim_value or 1 for d in dims]).astype(np.float32)
    captures = engine.capture(image, Activation.SIGMOID)
    with pytest.raises(UnknownMethod, match="no head VJP graph"):
        METHODS["gradcam"].compute(captures, rows([0], Target.LOGIT))
    with pytest.raises(UnknownMethod, match="no guided-backprop graph"):
        METHODS["guided_gradcam"].compute(captures, rows([0], Target.LOGIT))
    assert [m.name for m in METHODS.values()
            if Capability.HEAD_VJP in m.requires] == ["gradcam", "guided_gradcam"]
    crm = METHODS["crm"].compute(captures, rows([0, 2], Target.PROBABILITY))
    assert [m.index for m in crm] == [0, 2] and all(np.isfinite(m.values).all() for m in crm)


def _as_strided_head() -> onnx.ModelProto:
    """torch dynamo's as_strided in a head: positions computed from the image's batch."""
    rng = np.random.default_rng(3)
    i64 = lambda *v: onnx.numpy_helper.from_array(np.array(v, np.int64))
    inits = [
        onnx.numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.normal(size=(2, 4)).astype(np.float32), "fc"),
    ]
    for name, value in (("minus1", [-1]), ("zero", [0]), ("one", 1), ("four", 4),
                        ("four_v", [4]), ("start", 0)):
        tensor = i64(*value) if isinstance(value, list) else onnx.numpy_helper.from_array(
            np.array(value, np.int64))
        tensor.name = name
        inits.append(tensor)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["A"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["A"], ["A_relu"]),
        helper.make_node("GlobalAveragePool", ["A_relu"], ["P"]),
        helper.make_node("Reshape", ["P", "minus1"], ["flat"]),
        helper.make_node("Shape", ["image"], ["image_shape"]),
        helper.make_node("Gather", ["image_shape", "start"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "four"], ["total"]),
        helper.make_node("Range", ["start", "total", "one"], ["positions"]),
        helper.make_node("Gather", ["flat", "positions"], ["strided"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n_v"]),
        helper.make_node("Concat", ["n_v", "four_v"], ["rows"], axis=0),
        helper.make_node("Reshape", ["strided", "rows"], ["pooled"]),
        helper.make_node("Gemm", ["pooled", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "as_strided",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 2])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_head_reading_the_image_shape_is_still_cut_and_differentiated() -> None:
    """The Shape of the image inside the head is rebuilt from the target's batch."""
    model = _as_strided_head()
    compiled = compile_model(model, layout=Layout.NCHW, activation="none",
                             input_shape=(1, 3, 8, 8))
    assert compiled.split.target == "A_relu" and compiled.head_vjp is not None
    head_inputs = [i.name for i in compiled.head.graph.input]
    assert head_inputs == ["A_relu"], "the head does not need the image"
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    (expected,) = ReferenceEvaluator(model).run(None, {"image": image})
    acts = np.stack([engine.forward(image[i:i + 1])[0][0] for i in range(3)])
    np.testing.assert_allclose(engine.head(acts), expected, rtol=1e-5, atol=1e-6)
    # logits = mean over (h, w) of A · fcᵀ: ∂logit_k/∂A(c, h, w) = fc[k, c] / 64.
    fc = onnx.numpy_helper.to_array(model.graph.initializer[1])
    seed = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    grads = engine.head_vjp(acts, seed)
    expected_grads = (seed @ fc)[:, :, None, None] / 64 * np.ones((3, 4, 8, 8))
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-5, atol=1e-7)
