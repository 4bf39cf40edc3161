"""Guided backprop gates a Clip only where it is a rectifier, not inside a hard-sigmoid or a
hard-swish: which Clips count, a Keras-style MobileNetV3 block against a NumPy guided
backward written here, and the plain gradient of the same patterns against finite
differences.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.graph.autodiff import SEED, grad_name, vjp
from service.graph.autodiff.activations import clip_is_rectifier
from service.graph.build import compile_model
from service.graph.onnx_graph import GraphIndex
from service.runtime.engine import Engine
from service.runtime.sessions import make_session

CPU = ["CPUExecutionProvider"]


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list[int],
           out: str = "y", opset: int = 13, dtype: type = np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "clip",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info(out, elem, None)],
        initializer=[numpy_helper.from_array(
            v.astype(dtype) if v.dtype.kind == "f" else v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def _f(value: float | list[float]) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _n(op: str, inputs: list[str], out: str, **attrs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [out], **attrs)


# --- which Clips are rectifiers ---------------------------------------------------------

CONSTANTS = {"zero": _f(0.0), "six": _f(6.0), "three": _f(3.0), "minus3": _f([-3.0]),
             "sixth": _f(1 / 6), "half": _f(0.5), "fifth": _f(0.2), "one": _f(1.0),
             "minus1": _f(-1.0), "bias": _f([0.5, -1.0, 2.0])}

# name → (nodes from x (2, 3) to "y", whether the Clip "c" is a rectifier)
PATTERNS: dict[str, tuple[list[onnx.NodeProto], bool]] = {
    "relu6": ([_n("Clip", ["x", "zero", "six"], "y")], True),
    "relu_min_only": ([_n("Clip", ["x", "zero"], "y")], True),
    "relu6_after_bias_vector": ([_n("Add", ["x", "bias"], "b"),
                                 _n("Clip", ["b", "zero", "six"], "y")], True),
    "relu6_after_zero_shift": ([_n("Add", ["x", "zero"], "b"),
                                _n("Clip", ["b", "zero", "six"], "y")], True),
    "relu6_then_scale": ([_n("Clip", ["x", "zero", "six"], "c"),
                          _n("Mul", ["c", "sixth"], "y")], True),
    "relu6_times_another_tensor": ([_n("Mul", ["x", "three"], "t"),
                                    _n("Exp", ["x"], "e"),
                                    _n("Clip", ["e", "zero", "six"], "c"),
                                    _n("Mul", ["t", "c"], "y")], True),
    "keras_hard_sigmoid": ([_n("Add", ["x", "three"], "s"),
                            _n("Clip", ["s", "zero", "six"], "c"),
                            _n("Mul", ["c", "sixth"], "y")], False),
    "keras_hard_swish": ([_n("Add", ["x", "three"], "s"),
                          _n("Clip", ["s", "zero", "six"], "c"),
                          _n("Mul", ["c", "sixth"], "h"), _n("Mul", ["x", "h"], "y")], False),
    "hard_swish_mul_then_div": ([_n("Add", ["three", "x"], "s"),
                                 _n("Clip", ["s", "zero", "six"], "c"),
                                 _n("Mul", ["x", "c"], "m"), _n("Div", ["m", "six"], "y")],
                                False),
    "hard_sigmoid_constant_node": ([  # the shift as a Constant node, as torch writes it
        helper.make_node("Constant", [], ["c3"], value=numpy_helper.from_array(
            np.array(3.0, dtype=np.float32))),
        _n("Add", ["x", "c3"], "s"), _n("Clip", ["s", "zero", "six"], "c"),
        _n("Div", ["c", "six"], "y")], False),
    "shift_by_sub": ([_n("Sub", ["x", "minus3"], "s"),
                      _n("Clip", ["s", "zero", "six"], "y")], False),
    "keras2_hard_sigmoid": ([_n("Mul", ["x", "fifth"], "a"), _n("Add", ["a", "half"], "s"),
                             _n("Clip", ["s", "zero", "one"], "y")], False),
    "shift_then_scale": ([_n("Add", ["x", "three"], "s"), _n("Div", ["s", "six"], "d"),
                          _n("Clip", ["d", "zero", "one"], "y")], False),
    "unshifted_self_product": ([_n("Clip", ["x", "zero", "six"], "c"),
                                _n("Div", ["c", "six"], "d"), _n("Mul", ["d", "x"], "y")],
                               False),
    "min_not_zero": ([_n("Clip", ["x", "minus1", "one"], "y")], False),
    "no_min": ([_n("Clip", ["x", "", "six"], "y")], False),
    "max_not_positive": ([_n("Clip", ["x", "zero", "zero"], "y")], False),
    "max_computed": ([_n("Abs", ["x"], "m"), _n("Clip", ["x", "zero", "m"], "y")], False),
}


@pytest.mark.parametrize("name", list(PATTERNS), ids=list(PATTERNS))
def test_which_clips_are_rectifiers(name: str) -> None:
    nodes, expected = PATTERNS[name]
    used = {i for n in nodes for i in n.input}
    model = _model(nodes, {k: v for k, v in CONSTANTS.items() if k in used}, [2, 3])
    index = GraphIndex(model)
    (clip,) = [n for n in index.graph.node if n.op_type == "Clip"]
    assert clip_is_rectifier(index, clip) is expected


@pytest.mark.parametrize(("attrs", "expected"), [({"min": 0.0, "max": 6.0}, True),
                                                 ({"min": 0.0}, True),
                                                 ({"min": -1.0, "max": 1.0}, False),
                                                 ({"max": 6.0}, False)])
def test_clip_bounds_as_opset6_attributes(attrs: dict[str, float], expected: bool) -> None:
    model = _model([_n("Clip", ["x"], "y", **attrs)], {}, [2, 3], opset=6)
    index = GraphIndex(model)
    assert clip_is_rectifier(index, index.graph.node[0]) is expected


# --- a Keras-style MobileNetV3 block against a NumPy guided backward -------------------

C, HW, K = 6, 6, 4


def _block_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)

    def w(*shape: int, scale: float = 0.6) -> np.ndarray:
        return rng.normal(size=shape) * scale

    return {"stem_w": w(C, 3, 3, 3), "stem_b": w(C), "dw_w": w(C, 1, 3, 3, scale=0.8),
            "dw_b": w(C, scale=0.5) + 1.0, "se1_w": w(3, C, 1, 1), "se1_b": w(3),
            "se2_w": w(C, 3, 1, 1), "se2_b": w(C), "pw_w": w(C, C, 1, 1), "pw_b": w(C),
            "fc_w": w(K, C), "fc_b": w(K)}


def _block(dtype: type = np.float32) -> onnx.ModelProto:
    """Conv → hard-swish (Add 3, Clip 0..6, Mul x, Div 6) → depthwise Conv → ReLU6 (Clip)
    → squeeze-excite (GAP → Conv → Relu → Conv → hard-sigmoid as Add 3, Clip, Mul 1/6 →
    Mul) → Conv 1×1 → Keras hard-swish (Add 3, Clip, Mul 1/6, Mul x) → GAP → Gemm."""
    inits = _block_weights() | {
        "zero": _f(0.0), "three": _f(3.0), "six": _f(6.0), "sixth": _f(1 / 6)}
    nodes = [
        _n("Conv", ["x", "stem_w", "stem_b"], "stem", pads=[1] * 4),
        _n("Add", ["stem", "three"], "hs1_shift"),
        _n("Clip", ["hs1_shift", "zero", "six"], "hs1_clip"),
        _n("Mul", ["stem", "hs1_clip"], "hs1_mul"),
        _n("Div", ["hs1_mul", "six"], "hs1"),
        _n("Conv", ["hs1", "dw_w", "dw_b"], "dw", pads=[1] * 4, group=C),
        _n("Clip", ["dw", "zero", "six"], "relu6"),
        _n("GlobalAveragePool", ["relu6"], "se_gap"),
        _n("Conv", ["se_gap", "se1_w", "se1_b"], "se1"),
        _n("Relu", ["se1"], "se1_relu"),
        _n("Conv", ["se1_relu", "se2_w", "se2_b"], "se2"),
        _n("Add", ["se2", "three"], "hsig_shift"),
        _n("Clip", ["hsig_shift", "zero", "six"], "hsig_clip"),
        _n("Mul", ["hsig_clip", "sixth"], "hsig"),
        _n("Mul", ["relu6", "hsig"], "excited"),
        _n("Conv", ["excited", "pw_w", "pw_b"], "pw"),
        _n("Add", ["pw", "three"], "hs2_shift"),
        _n("Clip", ["hs2_shift", "zero", "six"], "hs2_clip"),
        _n("Mul", ["hs2_clip", "sixth"], "hs2_gate"),
        _n("Mul", ["pw", "hs2_gate"], "features"),
        _n("GlobalAveragePool", ["features"], "gap"),
        _n("Flatten", ["gap"], "flat"),
        _n("Gemm", ["flat", "fc_w", "fc_b"], "logits", transB=1),
    ]
    return _model(nodes, inits, [1, 3, HW, HW], out="logits", dtype=dtype)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, group: int) -> np.ndarray:
    """Stride-1 grouped convolution of (Cin, H, W), by kernel taps."""
    cg, m_per = w.shape[1], w.shape[0] // group
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    h, wd = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((w.shape[0], h, wd)) + b[:, None, None]
    for m in range(w.shape[0]):
        g = m // m_per
        for ky in range(kh):
            for kx in range(kw):
                out[m] += np.einsum("c,chw->hw", w[m, :, ky, kx],
                                    xp[g * cg:(g + 1) * cg, ky:ky + h, kx:kx + wd])
    return out


def _conv_back(g: np.ndarray, w: np.ndarray, pad: int, group: int,
               cin: int) -> np.ndarray:
    """The transpose of :func:`_conv` applied to g: d<g, conv(x)>/dx."""
    cg, m_per = w.shape[1], w.shape[0] // group
    kh, kw = w.shape[2:]
    h, wd = g.shape[1], g.shape[2]
    grad = np.zeros((cin, h + kh - 1, wd + kw - 1))
    for m in range(w.shape[0]):
        c0 = (m // m_per) * cg
        for ky in range(kh):
            for kx in range(kw):
                grad[c0:c0 + cg, ky:ky + h, kx:kx + wd] += (
                    w[m, :, ky, kx][:, None, None] * g[m][None])
    return grad[:, pad:grad.shape[1] - pad, pad:grad.shape[2] - pad]


def _hs(z: np.ndarray) -> np.ndarray:
    return np.clip(z + 3, 0, 6) / 6


def _hs_slope(z: np.ndarray) -> np.ndarray:
    return ((z > -3) & (z < 3)) / 6.0


def _numpy_block(x: np.ndarray, cls: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, ∂logit_cls/∂x) of :func:`_block` for x (3, H, W) in float64.

    rule: "plain" (the true gradient), "guided" (guided rule at the real ReLU6 and ReLU
    only) or "every_clip" (also at every Clip with min 0: what the rule must not do).
    """
    v = _block_weights()

    def gate(g: np.ndarray, pre: np.ndarray, low: float, high: float, rectifier: bool
             ) -> np.ndarray:
        if rule == "guided" and rectifier or rule == "every_clip":
            g = np.maximum(g, 0)
        return g * ((pre > low) & (pre < high))

    stem = _conv(x, v["stem_w"], v["stem_b"], 1, 1)
    hs1 = stem * _hs(stem)
    dw = _conv(hs1, v["dw_w"], v["dw_b"], 1, C)
    relu6 = np.clip(dw, 0, 6)
    se1 = v["se1_w"][:, :, 0, 0] @ relu6.mean(axis=(1, 2)) + v["se1_b"]
    se1_relu = np.maximum(se1, 0)
    se2 = v["se2_w"][:, :, 0, 0] @ se1_relu + v["se2_b"]
    hsig = _hs(se2)
    excited = relu6 * hsig[:, None, None]
    pw = np.einsum("mc,chw->mhw", v["pw_w"][:, :, 0, 0], excited) + v["pw_b"][:, None, None]
    features = pw * _hs(pw)
    logits = v["fc_w"] @ features.mean(axis=(1, 2)) + v["fc_b"]

    g_features = np.broadcast_to((v["fc_w"][cls] / (HW * HW))[:, None, None], features.shape)
    # features = pw · clip(pw + 3, 0, 6)/6: the Clip's own gradient, then the product rule
    g_pw = g_features * _hs(pw) + gate(g_features * pw / 6, pw + 3, 0, 6, False)
    g_excited = np.einsum("mc,mhw->chw", v["pw_w"][:, :, 0, 0], g_pw)
    g_relu6 = g_excited * hsig[:, None, None]
    g_hsig = (g_excited * relu6).sum(axis=(1, 2))
    g_se2 = gate(g_hsig / 6, se2 + 3, 0, 6, False)
    g_se1_relu = v["se2_w"][:, :, 0, 0].T @ g_se2
    g_se1 = g_se1_relu * (se1 > 0) if rule == "plain" else np.maximum(g_se1_relu, 0) * (se1 > 0)
    g_mean = v["se1_w"][:, :, 0, 0].T @ g_se1
    g_relu6 = g_relu6 + g_mean[:, None, None] / (HW * HW)
    g_dw = gate(g_relu6, dw, 0, 6, True)
    g_hs1 = _conv_back(g_dw, v["dw_w"], 1, C, C)
    g_stem = g_hs1 * _hs(stem) + gate(g_hs1 * stem / 6, stem + 3, 0, 6, False)
    return logits, _conv_back(g_stem, v["stem_w"], 1, 1, 3)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 3, HW, HW))


def _ort_gradients(model: onnx.ModelProto, x: np.ndarray, *, guided: bool) -> np.ndarray:
    """∂logit_k/∂x for every class k, (K, 3, H, W), from the emitted VJP graph in ORT."""
    session = make_session(vjp(model, "logits", ["x"], guided=guided), CPU, 1)
    return np.concatenate([
        session.run([grad_name("x")], {"x": x.astype(np.float32),
                                       SEED: np.eye(K, dtype=np.float32)[k:k + 1]})[0]
        for k in range(K)])


def test_numpy_block_matches_the_graph_and_its_plain_gradient_finite_differences() -> None:
    """The reference itself: its forward is the graph's, its plain backward is the finite
    differences of its forward."""
    x = _image(1)[0]
    session = make_session(_block(), CPU, 1)
    (logits,) = session.run(["logits"], {"x": x[None].astype(np.float32)})
    want, grad = _numpy_block(x, 2, "plain")
    np.testing.assert_allclose(logits[0], want, rtol=1e-5, atol=1e-5)
    eps, fd = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        fd[i] = (_numpy_block(up, 2, "plain")[0][2] - _numpy_block(down, 2, "plain")[0][2]
                 ) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * np.abs(fd).max())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_guided_block_gates_only_the_real_rectifiers(seed: int) -> None:
    model, x = _block(), _image(seed)
    got = _ort_gradients(model, x, guided=True)
    for k in range(K):
        want = _numpy_block(x[0], k, "guided")[1]
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-5 * scale)
        # The hard-swish and hard-sigmoid Clips matter here: gating them too is far off.
        wrong = _numpy_block(x[0], k, "every_clip")[1]
        assert np.abs(wrong - want).max() > 0.05 * scale


def test_guided_block_through_the_compiled_model() -> None:
    """The served path: compile_model's guided graph, run by the engine."""
    engine = Engine(compile_model(_block(), target_layer="features"), CPU, 1)
    x = _image(4)
    _, logits, grads = engine.guided(x.astype(np.float32), np.eye(K, dtype=np.float32))
    for k in range(K):
        want_logits, want = _numpy_block(x[0], k, "guided")
        np.testing.assert_allclose(logits[0], want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[k], want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max())


def test_plain_block_gradient_is_the_true_gradient() -> None:
    model, x = _block(), _image(5)
    got = _ort_gradients(model, x, guided=False)
    for k in range(K):
        want = _numpy_block(x[0], k, "plain")[1]
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --- ordinary rectifiers stay gated; the plain patterns against finite differences ------


@pytest.mark.parametrize("bias", [False, True])
def test_relu6_after_a_conv_is_still_gated(bias: bool) -> None:
    """Conv (bias in the Conv, or a separate per-channel Add as tf2onnx writes it) →
    Clip(0, 6): guided = relu(gy) · (0 < pre < 6), pre the Clip's input."""
    rng = np.random.default_rng(8)
    w, b = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=(1, 3, 1, 1))
    nodes = [_n("Conv", ["x", "w"], "conv", pads=[1] * 4)]
    if bias:
        nodes.append(_n("Add", ["conv", "b"], "pre"))
    nodes.append(_n("Clip", ["pre" if bias else "conv", "zero", "six"], "y"))
    inits = {"w": w, "zero": _f(0.0), "six": _f(6.0)} | ({"b": b} if bias else {})
    model = _model(nodes, inits, [1, 2, 5, 5], dtype=np.float64)
    x = rng.normal(size=(1, 2, 5, 5)) * 3
    seed = rng.normal(size=(1, 3, 5, 5))
    graph = vjp(model, "y", ["x"], guided=True)
    (grad,) = ReferenceEvaluator(graph).run([grad_name("x")], {"x": x, SEED: seed})
    (pre,) = ReferenceEvaluator(model).run(["pre" if bias else "conv"], {"x": x})
    masked = np.maximum(seed, 0) * ((pre > 0) & (pre < 6))
    probe = _model([_n("Conv", ["x", "w"], "y", pads=[1] * 4)], {"w": w}, [1, 2, 5, 5],
                   dtype=np.float64)
    (want,) = ReferenceEvaluator(vjp(probe, "y", ["x"])).run([grad_name("x")],
                                                             {"x": x, SEED: masked})
    np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)
    assert np.abs(want).max() > 0


def _away(a: np.ndarray, kinks: tuple[float, ...], margin: float = 0.05) -> np.ndarray:
    for k in kinks:
        near = np.abs(a - k) < margin
        a = np.where(near, k + np.where(a >= k, margin, -margin), a)
    return a


@pytest.mark.parametrize("name", ["keras_hard_sigmoid", "keras_hard_swish",
                                  "hard_swish_mul_then_div", "keras2_hard_sigmoid",
                                  "shift_then_scale", "unshifted_self_product"])
def test_plain_gradient_of_the_patterns_equals_finite_differences(name: str) -> None:
    """The plain VJP of each non-rectifier pattern against central finite differences in
    float64, and the guided VJP equal to it (nothing in these graphs is a rectifier)."""
    nodes, _ = PATTERNS[name]
    used = {i for n in nodes for i in n.input}
    model = _model(nodes, {k: v for k, v in CONSTANTS.items() if k in used}, [2, 3],
                   dtype=np.float64)
    x = _away(np.random.default_rng(9).uniform(-5, 8, size=(2, 3)),
              (-3.0, 0.0, 3.0, 6.0, -2.5, 2.5, 5.0))
    seed = np.random.default_rng(10).normal(size=(2, 3))
    forward = ReferenceEvaluator(model)
    eps, fd = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        fd[i] = float(np.sum(seed * (forward.run(["y"], {"x": up})[0]
                                     - forward.run(["y"], {"x": down})[0]))) / (2 * eps)
    grads = {}
    for guided in (False, True):
        graph = vjp(model, "y", ["x"], guided=guided)
        (grads[guided],) = ReferenceEvaluator(graph).run([grad_name("x")], {"x": x, SEED: seed})
    np.testing.assert_allclose(grads[False], fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grads[True], grads[False], rtol=1e-12, atol=1e-12)
    assert np.abs(grads[False]).max() > 0
