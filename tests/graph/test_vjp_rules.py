"""Every VJP rule against central finite differences in float64, one tiny graph per case.

The gradient graphs run in ONNX's reference evaluator (ONNX Runtime lacks float64 kernels
for several ops) and, rebuilt in float32, in ONNX Runtime, which must agree with the
float64 gradient to a relative 1e-4. Inputs keep away from kinks (rectifiers at 0, clip
bounds, pooling ties) so the finite differences see a smooth function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_max_pool import MaxPool as ReferenceMaxPool

from service.errors import CompileError
from service.graph.autodiff import RULES, SEED, grad_name, vjp
from service.runtime.sessions import make_session

CPU = ["CPUExecutionProvider"]
RNG = np.random.default_rng(20240611)
BLOCKED_RNG = np.random.default_rng(16)


class ConvTranspose(OpRun):
    """NumPy ConvTranspose for the reference evaluator, whose own one fails for group > 1
    with more than one output channel per group (it reshapes the weights wrongly).

    Explicit pads only, which is all the rules emit; checked against ORT below.
    """

    op_domain = ""

    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None,  # type: ignore[no-untyped-def]
             kernel_shape=None, output_padding=None, output_shape=None, pads=None,
             strides=None):
        rank = x.ndim - 2
        strides = strides or [1] * rank
        dilations = dilations or [1] * rank
        output_padding = output_padding or [0] * rank
        pads = pads or [0] * (2 * rank)
        group = group or 1
        kernel = w.shape[2:]
        per_in, per_out = x.shape[1] // group, w.shape[1]
        full = [s * (n - 1) + d * (k - 1) + 1 + p for s, n, d, k, p in
                zip(strides, x.shape[2:], dilations, kernel, output_padding)]
        y = np.zeros((x.shape[0], per_out * group, *full), dtype=np.float64)
        for g in range(group):
            xs = x[:, g * per_in:(g + 1) * per_in]
            for tap in np.ndindex(*kernel):
                contrib = np.einsum("nm...,mc->nc...", xs, w[g * per_in:(g + 1) * per_in, :, *tap])
                where = tuple(slice(d * t, d * t + s * (n - 1) + 1, s) for d, t, s, n in
                              zip(dilations, tap, strides, x.shape[2:]))
                y[(slice(None), slice(g * per_out, (g + 1) * per_out), *where)] += contrib
        y = y[(slice(None), slice(None),
               *[slice(pads[i], full[i] - pads[rank + i]) for i in range(rank)])]
        if b is not None:
            y += b.reshape(1, -1, *[1] * rank)
        return (y.astype(x.dtype),)


class MaxPool(ReferenceMaxPool):
    """The reference MaxPool, always on its general path: for stride 1 and dilation 1 it
    takes a shortcut whose Indices are wrong (neither flat nor per plane); ONNX Runtime's
    are flat over N·C·H·W as the spec says."""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None,  # type: ignore[no-untyped-def]
             kernel_shape=None, pads=None, storage_order=None, strides=None):
        return self._max_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode,
                              dilations=dilations or [1] * len(kernel_shape),
                              kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                              strides=strides or [1] * len(kernel_shape))


class Erf(OpRun):
    """The reference Erf in the input's precision: its own rounds to float32."""

    op_domain = ""

    def _run(self, x):  # type: ignore[no-untyped-def]
        return (np.vectorize(math.erf, otypes=[x.dtype])(x),)


class Gelu(OpRun):
    """Gelu-20 in the input's precision (the reference one expands to its float32 Erf)."""

    op_domain = ""

    def _run(self, x, approximate="none"):  # type: ignore[no-untyped-def]
        if approximate == "tanh":
            inner = np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)
            return (0.5 * x * (1 + np.tanh(inner)),)
        return (0.5 * x * (1 + np.vectorize(math.erf, otypes=[x.dtype])(x / np.sqrt(2))),)


FIXED_OPS = [ConvTranspose, MaxPool, Erf, Gelu]


@dataclass
class Case:
    nodes: list[onnx.NodeProto]
    inputs: dict[str, np.ndarray]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 13
    wrt: tuple[str, ...] = ("x",)
    of: str = "y"
    eps: float = 1e-6
    tol: float = 1e-6
    ort: bool = True
    ort64: bool = False  # run in ORT float64 where the reference evaluator cannot
    domains: tuple[str, ...] = ()  # opsets of other domains the nodes use (version 1)

    def model(self, dtype: type = np.float64, *, batch: str | None = None) -> onnx.ModelProto:
        """The forward model; ``batch`` makes the first axis of input x symbolic."""
        def cast(a: np.ndarray) -> np.ndarray:  # Resize scales stay float32
            return a.astype(dtype) if a.dtype == np.float64 else a

        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        graph = helper.make_graph(
            self.nodes, "case",
            [helper.make_tensor_value_info(
                k, helper.np_dtype_to_tensor_dtype(cast(v).dtype),
                (batch, *v.shape[1:]) if batch and k == "x" else v.shape)
             for k, v in self.inputs.items()],
            [helper.make_tensor_value_info(self.of, elem, None)],
            initializer=[numpy_helper.from_array(cast(v), k) for k, v in self.inits.items()],
        )
        opsets = [helper.make_opsetid("", self.opset),
                  *(helper.make_opsetid(d, 1) for d in self.domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 9
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
        return model


def _node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: object
          ) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs or ["y"], **attrs)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _normal(*shape: int) -> np.ndarray:
    return np.asarray(RNG.normal(size=shape))


def _away(a: np.ndarray, *kinks: float, margin: float = 0.05) -> np.ndarray:
    """``a`` with values within ``margin`` of a kink pushed out to the margin."""
    for k in kinks:
        near = np.abs(a - k) < margin
        a = np.where(near, k + np.where(a >= k, margin, -margin), a)
    return a


def _distinct(*shape: int) -> np.ndarray:
    """Values at least 0.01 apart, so pooling never sees a tie."""
    return RNG.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 0.3


def _unary(op: str, x: np.ndarray, opset: int = 13, **attrs: object) -> Case:
    return Case([_node(op, ["x"], **attrs)], {"x": x}, opset=opset)


def _run_ref(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]
             ) -> list[np.ndarray]:
    return ReferenceEvaluator(model, new_ops=FIXED_OPS).run(names, feeds)  # type: ignore[return-value]


def _forward(case: Case) -> object:
    """A callable feeds -> <output of the case> in float64."""
    model = case.model()
    if case.ort64:
        session = make_session(model, CPU, 1)
        return lambda feeds: session.run([case.of], feeds)[0]
    evaluator = ReferenceEvaluator(model, new_ops=FIXED_OPS)
    return lambda feeds: evaluator.run([case.of], feeds)[0]


def _fd(case: Case, name: str, seed: np.ndarray) -> np.ndarray:
    forward = _forward(case)
    out = np.zeros_like(case.inputs[name])
    for i in np.ndindex(out.shape):
        values = []
        for sign in (1, -1):
            feeds = dict(case.inputs)
            feeds[name] = feeds[name].copy()
            feeds[name][i] += sign * case.eps
            values.append(float(np.sum(seed * forward(feeds))))  # type: ignore[operator]
        out[i] = (values[0] - values[1]) / (2 * case.eps)
    return out


def _gradients(case: Case, dtype: type = np.float64, *, guided: bool = False,
               engine: str = "ref", seed: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    model = vjp(case.model(dtype), case.of, list(case.wrt), guided=guided)
    feeds = {k: np.asarray(v, dtype=dtype) if v.dtype == np.float64 else v
             for k, v in case.inputs.items()}
    if seed is None:
        y = _forward(case)(case.inputs)  # type: ignore[operator]
        seed = np.random.default_rng(7).normal(size=y.shape)
    feeds[SEED] = np.asarray(seed, dtype=dtype)
    names = [grad_name(w) for w in case.wrt]
    if engine == "ref" and not case.ort64:
        return seed, _run_ref(model, names, feeds)
    session = make_session(model, CPU, 1)
    return seed, session.run(names, feeds)  # type: ignore[return-value]


def _conv(x: tuple[int, ...], w: tuple[int, ...], bias: bool = True, weights_node: bool = False,
          **attrs: object) -> Case:
    inits = {"w": _normal(*w)}
    inputs = ["x", "w_used" if weights_node else "w"]
    nodes = [_node("Identity", ["w"], ["w_used"])] if weights_node else []
    if bias:
        inits["b"] = _normal(w[0])
        inputs.append("b")
    return Case([*nodes, _node("Conv", inputs, **attrs)], {"x": _normal(*x)}, inits)


def _pre_activation(channels: int, *, negative: bool, opset: int = 15) -> Case:
    """BatchNormalization → Relu → Conv, a DenseNet layer's start: the BN's gradient is the
    Conv's input gradient times the mask, which the compiler folds into the Conv's weights
    (autodiff/fold.py). Values of their own generator, so the other cases' stay put; the
    Relu's input is kept away from 0."""
    rng = np.random.default_rng(61 + channels + negative)
    scale = rng.uniform(0.5, 1.5, channels)
    if negative:
        scale[::3] *= -1.0
    bn = {"s": scale, "b": rng.normal(size=channels), "m": rng.normal(size=channels),
          "v": rng.uniform(0.5, 2, channels)}
    factor = bn["s"] / np.sqrt(bn["v"] + 1e-3)
    shift = (bn["b"] - bn["m"] * factor)[None, :, None, None]
    wanted = _away(rng.normal(size=(2, channels, 3, 3)), 0.0, margin=0.1)
    x = (wanted - shift) / factor[None, :, None, None]
    nodes = [_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
             _node("Relu", ["n"], ["r"]), _node("Conv", ["r", "w"], pads=[1, 1, 1, 1])]
    return Case(nodes, {"x": x}, {**bn, "w": rng.normal(size=(4, channels, 3, 3))},
                opset=opset)


def _conv_own_values(seed: int, x: tuple[int, ...], w: tuple[int, ...], bias: bool = True,
                     **attrs: object) -> Case:
    """A Conv case like :func:`_conv`'s with values from a generator of its own: a case
    added later leaves the module generator's values for every other case as they were."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.normal(size=w)} | ({"b": rng.normal(size=w[0])} if bias else {})
    return Case([_node("Conv", ["x", *inits], **attrs)], {"x": rng.normal(size=x)}, inits)


CONV = {
    "conv_s1_p1": _conv((2, 3, 5, 6), (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    "conv_s2_pads": _conv((2, 3, 7, 7), (4, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv_s2_nopad": _conv((1, 3, 8, 7), (4, 3, 3, 3), strides=[2, 2]),
    "conv_s2_asym_pads": _conv((1, 2, 7, 6), (3, 2, 3, 2), strides=[2, 2], pads=[0, 1, 2, 1]),
    "conv_s1_asym_pads": _conv((1, 2, 6, 5), (3, 2, 3, 3), pads=[0, 1, 2, 0]),
    "conv_s21_mixed": _conv((1, 2, 7, 6), (3, 2, 3, 2), strides=[2, 1], dilations=[1, 2],
                            pads=[1, 0, 1, 1]),
    "conv_dilation2": _conv((1, 2, 8, 8), (3, 2, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    "conv_dilation2_s2": _conv((1, 2, 9, 8), (3, 2, 3, 3), dilations=[2, 2], strides=[2, 2],
                               pads=[1, 1, 1, 1]),
    "conv_groups2": _conv((1, 4, 5, 5), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "conv_groups2_s2": _conv((1, 4, 7, 7), (6, 2, 3, 3), group=2, strides=[2, 2],
                             pads=[1, 1, 1, 1]),
    "conv_depthwise": _conv((2, 4, 6, 6), (4, 1, 3, 3), group=4, pads=[1, 1, 1, 1]),
    "conv_depthwise_x2_s2": _conv((1, 3, 7, 7), (6, 1, 3, 3), group=3, strides=[2, 2],
                                  pads=[1, 1, 1, 1]),
    "conv_same_upper_s2": _conv((1, 2, 7, 8), (3, 2, 3, 3), auto_pad="SAME_UPPER",
                                strides=[2, 2]),
    "conv_same_lower_s2": _conv((1, 2, 7, 8), (3, 2, 4, 3), auto_pad="SAME_LOWER",
                                strides=[2, 2]),
    "conv_same_upper_s1": _conv((1, 2, 5, 6), (3, 2, 4, 3), auto_pad="SAME_UPPER"),
    "conv_valid": _conv((1, 2, 6, 6), (3, 2, 3, 3), auto_pad="VALID", strides=[2, 2]),
    "conv_1x1": _conv((2, 3, 4, 4), (5, 3, 1, 1)),
    "conv_1x1_s2_nobias": _conv((1, 3, 5, 5), (4, 3, 1, 1), bias=False, strides=[2, 2]),
    "conv_nobias": _conv((1, 3, 5, 5), (2, 3, 3, 3), bias=False),
    "conv_pads_beyond_kernel": _conv((1, 2, 4, 4), (2, 2, 3, 3), pads=[3, 1, 2, 3]),
    "conv_weights_from_node": _conv((1, 4, 5, 5), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1],
                                    weights_node=True),
    "conv1d_s2": _conv((2, 3, 9), (4, 3, 3), strides=[2], pads=[1, 0]),
    "conv1d_s1": _conv((2, 3, 9), (4, 3, 3), pads=[1, 2]),
    "conv3d": _conv((1, 2, 4, 4, 3), (3, 2, 3, 3, 2), pads=[1, 1, 0, 1, 1, 1]),
    "conv3d_s2": _conv((1, 2, 5, 4, 4), (3, 2, 3, 3, 2), strides=[2, 2, 1], pads=[1] * 6),
    # 16 input channels, which ONNX Runtime's blocked layout takes: kernels spanning more
    # than two strides get the per-phase form, the others ConvTranspose, both followed by
    # the depthwise Conv back into the blocked layout (float32 only).
    "conv_phase_k5s2_odd": _conv((1, 16, 7, 9), (3, 16, 5, 5), strides=[2, 2], pads=[2] * 4),
    "conv_phase_k5s2_even_nopad": _conv((1, 16, 8, 6), (2, 16, 5, 5), bias=False,
                                        strides=[2, 2]),
    "conv_phase_k5s2_asym_pads": _conv((1, 16, 8, 7), (2, 16, 5, 5), strides=[2, 2],
                                       pads=[1, 2, 2, 0]),
    "conv_phase_k7s2p3": _conv((1, 16, 9, 8), (2, 16, 7, 7), strides=[2, 2], pads=[3] * 4),
    "conv_phase_k7s3": _conv((1, 16, 10, 8), (2, 16, 7, 7), strides=[3, 3], pads=[3, 2, 1, 3]),
    "conv_phase_k5x7_s2": _conv((1, 16, 7, 8), (2, 16, 5, 7), strides=[2, 2], pads=[2, 3, 2, 3]),
    # an input ONNX Runtime does not block (a stem's image): every phase in one convolution
    **{name: _conv_own_values(63 + i, x, w, **attrs) for i, (name, x, w, attrs) in enumerate([
        ("conv_phase_stem_k7s2p3", (1, 3, 9, 10), (16, 3, 7, 7),
         {"strides": [2, 2], "pads": [3] * 4}),
        ("conv_phase_stem_k5s2_asym", (1, 2, 8, 7), (16, 2, 5, 5),
         {"strides": [2, 2], "pads": [2, 1, 1, 2], "bias": False}),
        ("conv_phase_stem_k7s3", (1, 3, 10, 8), (16, 3, 7, 7),
         {"strides": [3, 3], "pads": [3, 2, 1, 3]})])},
    "conv_blocked_k3s2": _conv((1, 16, 7, 6), (3, 16, 3, 3), strides=[2, 2], pads=[1] * 4),
    "conv_blocked_k1s2": _conv((1, 16, 6, 7), (4, 16, 1, 1), bias=False, strides=[2, 2]),
    "conv_blocked_k3s3": _conv((1, 16, 8, 7), (2, 16, 3, 3), strides=[3, 3], pads=[1, 0, 1, 2]),
    "conv_blocked_groups2_s2": _conv((1, 32, 5, 5), (4, 16, 5, 5), group=2, strides=[2, 2],
                                     pads=[2] * 4),
    "conv_blocked_dilation2_s2": _conv((1, 16, 8, 7), (2, 16, 3, 3), dilations=[2, 2],
                                       strides=[2, 2], pads=[2] * 4),
}


def _max_pool(shape: tuple[int, ...], opset: int = 13, **attrs: object) -> Case:
    return Case([_node("MaxPool", ["x"], **attrs)], {"x": _distinct(*shape)}, opset=opset)


MAXPOOL = {
    f"{name}_opset{opset}": _max_pool(shape, opset, **attrs)
    for opset in (13, 18)
    for name, shape, attrs in [
        ("k2s2", (2, 3, 6, 7), {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("k3s2p1_overlap", (1, 2, 7, 7),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("k3s1_overlap", (1, 2, 5, 6), {"kernel_shape": [3, 3]}),
        ("ceil_pads", (1, 2, 6, 7),
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1}),
        ("dilation2", (1, 2, 7, 7),
         {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [1, 2]}),
        ("same_upper", (1, 2, 5, 6),
         {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        ("1d", (2, 2, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ]
}


def _avg_pool(shape: tuple[int, ...], opset: int = 13, **attrs: object) -> Case:
    return Case([_node("AveragePool", ["x"], **attrs)], {"x": _normal(*shape)}, opset=opset)


AVGPOOL = {
    "avg_k2s2": _avg_pool((2, 3, 6, 7), kernel_shape=[2, 2], strides=[2, 2]),
    "avg_k3s2_pads_include": _avg_pool((1, 2, 7, 6), kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1], count_include_pad=1),
    "avg_k3s2_pads_exclude": _avg_pool((1, 2, 7, 6), kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1], count_include_pad=0),
    "avg_ceil_include": _avg_pool((1, 2, 7, 8), kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 0, 0, 1], ceil_mode=1, count_include_pad=1),
    "avg_ceil_exclude": _avg_pool((1, 2, 7, 8), kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 0, 0, 1], ceil_mode=1, count_include_pad=0),
    "avg_ceil_nopad": _avg_pool((1, 2, 7, 5), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "avg_k2s3": _avg_pool((1, 2, 8, 7), kernel_shape=[2, 2], strides=[3, 3]),
    "avg_k3s1_overlap": _avg_pool((1, 2, 5, 5), kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avg_same_upper": _avg_pool((1, 2, 7, 6), kernel_shape=[3, 3], strides=[2, 2],
                                auto_pad="SAME_UPPER", count_include_pad=0),
    "avg_same_lower_include": _avg_pool((1, 2, 6, 7), kernel_shape=[2, 3], strides=[2, 2],
                                        auto_pad="SAME_LOWER", count_include_pad=1),
    "avg_dilation_opset19": _avg_pool((1, 2, 7, 7), opset=19, kernel_shape=[2, 2],
                                      dilations=[2, 2], pads=[1, 1, 0, 0], count_include_pad=1),
    "avg_1d": _avg_pool((2, 2, 9), kernel_shape=[3], strides=[2], pads=[1, 1]),
}


def _binary(op: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> Case:
    b = _normal(*shape_b)
    if op == "Div":
        b = np.asarray(np.sign(b) * (np.abs(b) + 0.5))
    return Case([_node(op, ["x", "w"])], {"x": _normal(*shape_a), "w": b}, wrt=("x", "w"))


BROADCAST = {
    f"{op.lower()}_{name}": _binary(op, a, b)
    for op in ("Add", "Sub", "Mul", "Div")
    for name, a, b in [
        ("same", (2, 3, 2, 2), (2, 3, 2, 2)),
        ("c11", (2, 3, 2, 2), (3, 1, 1)),
        ("1c11", (2, 3, 2, 2), (1, 3, 1, 1)),
        ("scalar", (2, 3, 2, 2), ()),
        ("nc11_se", (2, 3, 2, 2), (2, 3, 1, 1)),
        ("reversed", (3, 1, 1), (2, 3, 2, 2)),
    ]
}


def _reduce(op: str, opset: int, keepdims: int, axes: list[int],
            x: np.ndarray | None = None) -> Case:
    x = _normal(2, 3, 4) if x is None else x
    axes_as_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_as_input:
        node = _node(op, ["x", "axes"], keepdims=keepdims)
        return Case([node], {"x": x}, {"axes": _i64(*axes)}, opset=opset)
    return Case([_node(op, ["x"], keepdims=keepdims, axes=axes)], {"x": x}, opset=opset)


# Inputs each reduction is smooth at: |x| away from 0 for ReduceL1, no ties for Max/Min.
REDUCE_INPUTS = {
    "ReduceSumSquare": lambda: _normal(2, 3, 4),
    "ReduceL2": lambda: _normal(2, 3, 4),
    "ReduceL1": lambda: _away(_normal(2, 3, 4), 0.0),
    "ReduceLogSumExp": lambda: _normal(2, 3, 4),
    "ReduceMax": lambda: _distinct(2, 3, 4),
    "ReduceMin": lambda: _distinct(2, 3, 4),
}


def _gemm(ta: int, tb: int, beta: float = 1.0) -> Case:
    a = _normal(4, 3) if ta else _normal(3, 4)
    b = _normal(5, 4) if tb else _normal(4, 5)
    return Case([_node("Gemm", ["x", "w", "c"], transA=ta, transB=tb, alpha=0.7, beta=beta)],
                {"x": a, "w": b, "c": _normal(5)}, wrt=("x", "w", "c"))


def _resize(x_shape: tuple[int, ...], scales: list[float] | None = None,
            sizes: list[int] | None = None, opset: int = 13, **attrs: object) -> Case:
    inits = {"roi": np.zeros(0)}
    if scales is not None:
        inits["scales"] = np.array(scales, dtype=np.float32)
        inputs = ["x", "roi", "scales"]
    else:
        inits["scales"] = np.zeros(0, dtype=np.float32)
        inits["sizes"] = np.array(sizes, dtype=np.int64)
        inputs = ["x", "roi", "scales", "sizes"]
    return Case([_node("Resize", inputs, **attrs)], {"x": _normal(*x_shape)}, inits, opset=opset)


def _clip(x: np.ndarray, low: float | None, high: float | None) -> Case:
    inputs, inits = ["x"], {}
    inputs.append("lo" if low is not None else "")
    if low is not None:
        inits["lo"] = np.array(low)
    if high is not None:
        inputs.append("hi")
        inits["hi"] = np.array(high)
    return Case([_node("Clip", inputs)], {"x": x}, inits)


def _slice(shape: tuple[int, ...], starts: list[int], ends: list[int],
           axes: list[int] | None = None, steps: list[int] | None = None) -> Case:
    inits = {"starts": _i64(*starts), "ends": _i64(*ends)}
    inputs = ["x", "starts", "ends"]
    if axes is not None:
        inits["axes"] = _i64(*axes)
        inputs.append("axes")
    if steps is not None:
        inits["steps"] = _i64(*steps)
        inputs.append("steps")
    # Multiply so the gradient is not a plain seed copy.
    nodes = [_node("Slice", inputs, ["s"]), _node("Mul", ["s", "s"])]
    return Case(nodes, {"x": _normal(*shape)}, inits)


def _pad(shape: tuple[int, ...], pads: list[int], mode: str = "constant", opset: int = 13,
         axes: list[int] | None = None, ort64: bool = False) -> Case:
    inits = {"pads": _i64(*pads)}
    inputs = ["x", "pads"]
    if axes is not None:
        inits["value"] = np.array(0.5)
        inits["axes"] = _i64(*axes)
        inputs += ["value", "axes"]
    nodes = [_node("Pad", inputs, ["p"], mode=mode), _node("Mul", ["p", "p"])]
    return Case(nodes, {"x": _normal(*shape)}, inits, opset=opset, ort64=ort64)


def _split(opset: int, *, num_outputs: bool = False) -> Case:
    if num_outputs:
        node = _node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
        inits = {}
    else:
        node = _node("Split", ["x", "split"], ["a", "b", "c"], axis=1)
        inits = {"split": _i64(2, 2, 2)}
    return Case([node, _node("Mul", ["a", "c"])], {"x": _normal(2, 6, 3)}, inits, opset=opset)


def _resize_to_shape_sizes() -> Case:
    """Resize as PyTorch exports interpolate(size=...): sizes computed from Shape(x)."""
    nodes = [
        _node("Shape", ["x"], ["shape"]),
        _node("Slice", ["shape", "zero", "two"], ["nc"]),
        _node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        _node("Resize", ["x", "", "", "sizes"], mode="linear"),
    ]
    inits = {"zero": _i64(0), "two": _i64(2), "hw": _i64(5, 7)}
    return Case(nodes, {"x": _normal(1, 2, 3, 4)}, inits)


def _shape_arithmetic() -> Case:
    """Flatten as PyTorch exports it: the shape path carries no gradient."""
    nodes = [
        _node("Shape", ["x"], ["shape"]),
        _node("Gather", ["shape", "zero"], ["n"], axis=0),
        _node("Unsqueeze", ["n", "axes0"], ["n1"]),
        _node("Concat", ["n1", "minus1"], ["target"], axis=0),
        _node("Reshape", ["x", "target"], ["flat"]),
        _node("Tanh", ["flat"]),
    ]
    inits = {"zero": np.array(0, dtype=np.int64), "axes0": _i64(0), "minus1": _i64(-1)}
    return Case(nodes, {"x": _normal(2, 3, 2)}, inits)


def _size_scaled() -> Case:
    """x / Cast(Size(x)): Size and the int Cast stop the walk."""
    nodes = [_node("Size", ["x"], ["n"]), _node("Cast", ["n"], ["nf"], to=TensorProto.DOUBLE),
             _node("Div", ["x", "nf"], ["d"]), _node("Mul", ["d", "x"])]
    return Case(nodes, {"x": _normal(2, 3)}, ort=False)


def _cast_float() -> Case:
    x = _normal(2, 3).astype(np.float32)
    nodes = [_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE), _node("Mul", ["x64", "w"])]
    # The function is linear, so a large step is exact up to float32 rounding of x.
    return Case(nodes, {"x": x}, {"w": _normal(2, 3)}, eps=1e-2, tol=1e-5, ort=False)


def _cast_like() -> Case:
    # Neg: shape inference leaves CastLike's output shape unknown, which Mul would need.
    nodes = [_node("CastLike", ["x", "like"], ["x32"]), _node("Neg", ["x32"])]
    return Case(nodes, {"x": _normal(2, 3)}, {"like": np.zeros(1, dtype=np.float32)},
                opset=15, eps=1e-2, tol=1e-5, ort=False)


def _comparison_mask() -> Case:
    """x · [x > 0] with the mask built by Greater and Cast: no gradient through the mask."""
    nodes = [_node("Greater", ["x", "zero"], ["pos"]),
             _node("Cast", ["pos"], ["mask"], to=TensorProto.DOUBLE),
             _node("Mul", ["x", "mask"])]
    return Case(nodes, {"x": _away(_normal(2, 3), 0.0)}, {"zero": np.array(0.0)}, ort=False)


def _constant_of_shape() -> Case:
    """x + ConstantOfShape(Shape(x)): the gradient reaching ConstantOfShape stops there."""
    one = helper.make_tensor("one", TensorProto.DOUBLE, [1], [1.5])
    nodes = [_node("Shape", ["x"], ["shape"]),
             _node("ConstantOfShape", ["shape"], ["c"], value=one),
             _node("Mul", ["x", "x"], ["sq"]), _node("Add", ["sq", "c"])]
    return Case(nodes, {"x": _normal(2, 3)}, ort=False)


def _gather(indices: np.ndarray, axis: int) -> Case:
    nodes = [_node("Gather", ["x", "idx"], ["g"], axis=axis), _node("Mul", ["g", "g"])]
    return Case(nodes, {"x": _normal(3, 4, 2)}, {"idx": indices})


def _layer_norm(shape: tuple[int, ...], axis: int, *, bias: bool = True,
                scale_shape: tuple[int, ...] | None = None, grads: bool = False,
                stats: bool = False, **attrs: object) -> Case:
    """LayerNormalization-17 over axes axis..rank-1; ``grads``: Scale and B are inputs to
    differentiate too; ``stats``: the optional Mean and InvStdDev outputs are written (and
    unused)."""
    normalized = shape[axis % len(shape):]
    params = {"s": RNG.uniform(0.5, 1.5, size=scale_shape or normalized)}
    if bias:
        params["b"] = _normal(*(scale_shape or normalized))
    inputs = ["x", "s", "b"] if bias else ["x", "s"]
    outputs = ["y", "mean", "inv_std"] if stats else ["y"]
    node = _node("LayerNormalization", inputs, outputs, axis=axis, **attrs)
    if grads:
        return Case([node], {"x": _normal(*shape), **params}, opset=17,
                    wrt=("x", *params))
    return Case([node], {"x": _normal(*shape)}, params, opset=17)


def _layer_norm_channels_last() -> Case:
    """ConvNeXt's LayerNorm2d as exported: NCHW → NHWC, normalise over C, back to NCHW."""
    nodes = [_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
             _node("LayerNormalization", ["nhwc", "s", "b"], ["ln"], axis=-1, epsilon=1e-6),
             _node("Transpose", ["ln"], perm=[0, 3, 1, 2])]
    return Case(nodes, {"x": _normal(2, 4, 3, 2)},
                {"s": RNG.uniform(0.5, 1.5, size=4), "b": _normal(4)}, opset=17)


def _layer_norm_stats_used() -> Case:
    """y = LN(x) · InvStdDev + Mean: gradients reach the optional outputs too. They have the
    stash type (float32 here), hence the CastLikes."""
    nodes = [_node("LayerNormalization", ["x", "s"], ["ln", "mean", "inv_std"], axis=1),
             _node("CastLike", ["mean", "x"], ["mean_x"]),
             _node("CastLike", ["inv_std", "x"], ["inv_std_x"]),
             _node("Mul", ["ln", "inv_std_x"], ["scaled"]), _node("Add", ["scaled", "mean_x"])]
    return Case(nodes, {"x": _normal(2, 3, 4)}, {"s": RNG.uniform(0.5, 1.5, size=(3, 4))},
                opset=17)


def _layer_norm_decomposed(opset: int) -> Case:
    """LayerNorm as some exporters write it: ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul, Add."""
    def mean(inp: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return _node("ReduceMean", [inp, "axes"], [out], keepdims=1)
        return _node("ReduceMean", [inp], [out], axes=[-1], keepdims=1)

    nodes = [mean("x", "mu"), _node("Sub", ["x", "mu"], ["d"]),
             _node("Pow", ["d", "two"], ["d2"]), mean("d2", "var"),
             _node("Add", ["var", "eps"], ["var_eps"]), _node("Sqrt", ["var_eps"], ["sd"]),
             _node("Div", ["d", "sd"], ["xhat"]), _node("Mul", ["xhat", "s"], ["scaled"]),
             _node("Add", ["scaled", "b"])]
    inits = {"two": np.array(2.0), "eps": np.array(1e-5), "s": RNG.uniform(0.5, 1.5, size=5),
             "b": _normal(5)}
    if opset >= 18:
        inits["axes"] = _i64(-1)
    return Case(nodes, {"x": _normal(2, 3, 5)}, inits, opset=opset)


def _gelu_decomposed() -> Case:
    """GELU as torch's legacy exporter writes it: x · (1 + Erf(x / √2)) · 0.5."""
    nodes = [_node("Div", ["x", "sqrt2"], ["scaled"]), _node("Erf", ["scaled"], ["e"]),
             _node("Add", ["e", "one"], ["e1"]), _node("Mul", ["x", "e1"], ["m"]),
             _node("Mul", ["m", "half"])]
    inits = {"sqrt2": np.array(np.sqrt(2.0)), "one": np.array(1.0), "half": np.array(0.5)}
    return Case(nodes, {"x": 2 * _normal(2, 3, 4)}, inits)


def _gather_flat(indices: np.ndarray, opset: int = 13) -> Case:
    """torch dynamo's as_strided: Reshape(x, [-1]) → Gather; with a symbolic batch the flat
    size is known only at run time."""
    nodes = [_node("Reshape", ["x", "minus1"], ["flat"]),
             _node("Gather", ["flat", "idx"], ["g"], axis=0), _node("Mul", ["g", "g"])]
    return Case(nodes, {"x": _normal(2, 3)}, {"minus1": _i64(-1), "idx": indices}, opset=opset)


def _positive(*shape: int) -> np.ndarray:
    return np.asarray(RNG.uniform(0.5, 2.0, size=shape))


def _pow(x: np.ndarray, exponent: np.ndarray, *, wrt_exponent: bool = False,
         opset: int = 13) -> Case:
    if wrt_exponent:
        return Case([_node("Pow", ["x", "p"])], {"x": x, "p": exponent}, opset=opset,
                    wrt=("x", "p"))
    return Case([_node("Pow", ["x", "p"])], {"x": x}, {"p": exponent}, opset=opset)


def _variadic(op: str, shapes: list[tuple[int, ...]], values: object = _normal) -> Case:
    """``op`` over x, w (inputs) and c (a constant), broadcasting."""
    names = ["x", "w", "c"][: len(shapes)]
    arrays = {n: values(*shape) for n, shape in zip(names, shapes)}  # type: ignore[operator]
    inits = {"c": arrays.pop("c")} if "c" in arrays else {}
    return Case([_node(op, names)], arrays, inits, wrt=tuple(a for a in names if a != "c"))


def _where(x_shape: tuple[int, ...], w_shape: tuple[int, ...],
           cond_shape: tuple[int, ...]) -> Case:
    cond = RNG.uniform(size=cond_shape) > 0.5
    return Case([_node("Where", ["cond", "x", "w"])], {"x": _normal(*x_shape),
                "w": _normal(*w_shape)}, {"cond": cond}, wrt=("x", "w"))


def _tile(shape: tuple[int, ...], repeats: list[int]) -> Case:
    nodes = [_node("Tile", ["x", "repeats"], ["t"]), _node("Mul", ["t", "t"])]
    return Case(nodes, {"x": _normal(*shape)}, {"repeats": _i64(*repeats)})


def _mod() -> Case:
    """fmod with a and c away from the jumps (a/c away from integers)."""
    c = RNG.uniform(0.8, 1.2, size=(3, 4)) * RNG.choice([-1.0, 1.0], size=(3, 4))
    quotient = RNG.integers(0, 4, size=(2, 3, 4)) + RNG.uniform(0.2, 0.8, size=(2, 3, 4))
    a = quotient * c * RNG.choice([-1.0, 1.0], size=(2, 3, 4))
    return Case([_node("Mod", ["x", "w"], fmod=1)], {"x": a, "w": c}, wrt=("x", "w"))


OTHER = {
    # activations
    "relu": _unary("Relu", _away(_normal(2, 3, 4), 0.0)),
    # 16 channels of a 4-D float32 tensor: the forms ONNX Runtime keeps in its blocked
    # layout (builder.NCHWC_BLOCK), with values of their own so the other cases' stay put
    "relu_blocked": _unary("Relu", _away(BLOCKED_RNG.normal(size=(2, 16, 2, 3)), 0.0)),
    "leaky_relu": _unary("LeakyRelu", _away(_normal(2, 3, 4), 0.0), alpha=0.1),
    "prelu_per_channel": Case([_node("PRelu", ["x", "slope"])],
                              {"x": _away(_normal(2, 3, 2, 2), 0.0)},
                              {"slope": RNG.uniform(0.05, 0.5, size=(3, 1, 1))}),
    "prelu_slope_grad": Case([_node("PRelu", ["x", "slope"])],
                             {"x": _away(_normal(2, 3, 2, 2), 0.0),
                              "slope": RNG.uniform(0.05, 0.5, size=(3, 1, 1))},
                             wrt=("x", "slope")),
    "sigmoid": _unary("Sigmoid", _normal(2, 5)),
    "tanh": _unary("Tanh", _normal(2, 5)),
    "softmax_axis1": _unary("Softmax", _normal(2, 4, 3), axis=1),
    "softmax_last": _unary("Softmax", _normal(2, 4, 3)),
    "log_softmax": _unary("LogSoftmax", _normal(2, 5), axis=-1),
    "clip_relu6": _clip(_away(RNG.uniform(-2, 8, size=(2, 3, 4)), 0.0, 6.0), 0.0, 6.0),
    "clip_relu6_blocked": _clip(_away(BLOCKED_RNG.uniform(-2, 8, size=(1, 16, 2, 3)), 0.0,
                                      6.0), 0.0, 6.0),
    "clip_min_only": _clip(_away(_normal(2, 3, 4), -0.5), -0.5, None),
    "clip_max_only": _clip(_away(_normal(2, 3, 4), 0.3), None, 0.3),
    "clip_none": _clip(_normal(2, 3), None, None),
    "hard_sigmoid": _unary("HardSigmoid", _away(RNG.uniform(-4, 4, size=(2, 3, 4)), -2.5, 2.5)),
    "hard_sigmoid_attrs": _unary("HardSigmoid", _away(RNG.uniform(-3, 3, (2, 9)), -1.25, 1.25),
                                 alpha=0.4, beta=0.5),
    "hard_swish": _unary("HardSwish", _away(RNG.uniform(-5, 5, size=(2, 3, 4)), -3.0, 3.0),
                         opset=14),
    "neg": _unary("Neg", _normal(2, 3)),
    # linear
    "matmul_batch_broadcast": Case([_node("MatMul", ["x", "w"])],
                                   {"x": _normal(2, 3, 4, 5), "w": _normal(5, 6)},
                                   wrt=("x", "w")),
    "matmul_both_batched": Case([_node("MatMul", ["x", "w"])],
                                {"x": _normal(3, 4, 5), "w": _normal(2, 1, 5, 2)},
                                wrt=("x", "w")),
    **{f"gemm_tA{ta}_tB{tb}": _gemm(ta, tb) for ta in (0, 1) for tb in (0, 1)},
    "batch_norm": Case([_node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
                       {"x": _normal(2, 3, 2, 2)},
                       {"s": _normal(3), "b": _normal(3), "m": _normal(3),
                        "v": RNG.uniform(0.5, 2, 3)},
                       # The reference BatchNormalization-9 (opset 13) runs in training mode.
                       opset=15),
    "batch_norm_blocked": Case(
        [_node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
        {"x": BLOCKED_RNG.normal(size=(2, 16, 2, 2))},
        {k: BLOCKED_RNG.normal(size=16) for k in "sbm"} | {"v": BLOCKED_RNG.uniform(0.5, 2, 16)},
        opset=15),
    # the BN gradient folded into the next Conv's input gradient (both signs of scale;
    # 16 channels: the depthwise-Conv form of the scaling, in float32)
    "batch_norm_relu_conv": _pre_activation(3, negative=False),
    "batch_norm_relu_conv_negative": _pre_activation(3, negative=True),
    "batch_norm_relu_conv_blocked": _pre_activation(16, negative=False),
    # reductions and global pools
    **{f"{op.lower()}_keep{k}_opset{o}": _reduce(op, o, k, [1, -1])
       for op in ("ReduceMean", "ReduceSum") for o in (13, 18) for k in (0, 1)},
    "global_average_pool": _unary("GlobalAveragePool", _normal(2, 3, 3, 4)),
    "global_max_pool": _unary("GlobalMaxPool", _distinct(2, 3, 3, 4)),
    # moving values around
    "identity": _unary("Identity", _normal(2, 3)),
    "dropout": _unary("Dropout", _normal(2, 3)),
    "transpose": _unary("Transpose", _normal(2, 3, 4), perm=[2, 0, 1]),
    "transpose_default": _unary("Transpose", _normal(2, 3, 4)),
    "reshape": Case([_node("Reshape", ["x", "shape"])], {"x": _normal(2, 3, 4)},
                    {"shape": _i64(4, -1)}),
    "flatten": _unary("Flatten", _normal(2, 3, 2, 2), axis=2),
    "squeeze": Case([_node("Squeeze", ["x", "axes"])], {"x": _normal(2, 1, 3)}, {"axes": _i64(1)}),
    "unsqueeze": Case([_node("Unsqueeze", ["x", "axes"])], {"x": _normal(2, 3)},
                      {"axes": _i64(0, 3)}),
    "expand": Case([_node("Expand", ["x", "shape"])], {"x": _normal(3, 1)},
                   {"shape": _i64(2, 3, 4)}),
    "concat_axis1": Case([_node("Concat", ["x", "w", "c"], axis=1)],
                         {"x": _normal(2, 3, 2), "w": _normal(2, 1, 2)},
                         {"c": _normal(2, 2, 2)}, wrt=("x", "w")),
    "concat_axis2": Case([_node("Concat", ["x", "w"], axis=-1)],
                         {"x": _normal(2, 3, 2), "w": _normal(2, 3, 4)}, wrt=("x", "w")),
    "split_3_one_unused": _split(13),
    "split_num_outputs_opset18": _split(18, num_outputs=True),
    "slice_step1": _slice((3, 5, 4), [1, 0], [3, 2**62], axes=[1, 2]),
    "slice_negative_starts": _slice((3, 6, 4), [-4, -3], [-1, 4], axes=[1, 2]),
    "slice_steps2_axes_subset": _slice((3, 7, 4), [1], [7], axes=[1], steps=[2]),
    "slice_negative_steps": _slice((3, 6, 5), [-1, 4], [-2**62, 0], axes=[1, 2], steps=[-2, -1]),
    "slice_all_axes_default": _slice((4, 5), [1, 1], [3, -1]),
    "pad_constant": _pad((2, 3, 4), [0, 1, 2, 0, 2, 1]),
    # The reference evaluator's Pad refuses negative pads.
    "pad_constant_negative": _pad((2, 5, 4), [0, -1, 2, 0, 2, -1], ort64=True),
    "pad_constant_axes_opset18": _pad((2, 3, 4), [1, 2, 0, 1], opset=18, axes=[2, 1]),
    "pad_reflect": _pad((2, 4, 5), [0, 2, 3, 0, 3, 1], mode="reflect"),
    "pad_edge": _pad((2, 3, 4), [0, 2, 1, 0, 3, 2], mode="edge"),
    "pad_wrap_opset19": _pad((2, 3, 4), [0, 2, 1, 0, 1, 3], mode="wrap", opset=19),
    # resize
    "resize_nearest_x2": _resize((1, 2, 3, 4), [1, 1, 2, 2]),
    "resize_nearest_asym_floor": _resize((1, 2, 3, 4), [1, 1, 2, 3],
                                         coordinate_transformation_mode="asymmetric",
                                         nearest_mode="floor"),
    "resize_nearest_down_sizes": _resize((1, 2, 6, 7), sizes=[1, 2, 3, 4], mode="nearest"),
    "resize_linear_x2_half_pixel": _resize((1, 2, 3, 4), [1, 1, 2, 2], mode="linear"),
    "resize_linear_x2_align_corners": _resize((1, 2, 3, 4), [1, 1, 2, 2], mode="linear",
                                              coordinate_transformation_mode="align_corners"),
    "resize_linear_asymmetric": _resize((1, 2, 3, 4), [1, 1, 2, 2], mode="linear",
                                        coordinate_transformation_mode="asymmetric"),
    "resize_linear_pytorch_x1_5": _resize((1, 2, 4, 4), [1, 1, 1.5, 1.5], mode="linear",
                                          coordinate_transformation_mode="pytorch_half_pixel"),
    "resize_linear_sizes_down": _resize((1, 2, 7, 8), sizes=[1, 2, 3, 5], mode="linear"),
    "resize_cubic_x2": _resize((1, 2, 4, 5), [1, 1, 2, 2], mode="cubic"),
    "resize_cubic_exclude_outside": _resize((1, 2, 4, 5), [1, 1, 2, 2], mode="cubic",
                                            exclude_outside=1, cubic_coeff_a=-0.5),
    "resize_sizes_from_shape": _resize_to_shape_sizes(),
    "resize_axes_opset18": _resize((1, 2, 3, 4), [2.0, 3.0], opset=18, axes=[2, 3],
                                   mode="linear"),
    # constants, casts and gathers
    "shape_arithmetic": _shape_arithmetic(),
    "size_cast_int": _size_scaled(),
    "cast_float32_to_float64": _cast_float(),
    "cast_like": _cast_like(),
    "comparison_mask": _comparison_mask(),
    "constant_of_shape": _constant_of_shape(),
    "gather_vector_indices": _gather(_i64(2, 0, 2), axis=1),
    "gather_matrix_indices": _gather(np.array([[0, -1], [1, 0]], dtype=np.int64), axis=0),
    "gather_scalar_index": _gather(np.array(1, dtype=np.int64), axis=2),
    "gather_matrix_indices_axis1": _gather(np.array([[3, 1, 1]], dtype=np.int64), axis=1),
    "gather_flat": _gather_flat(np.array([[[0]], [[4]], [[1]], [[5]]], dtype=np.int64)),
    "gather_flat_repeats_opset16": _gather_flat(_i64(0, 4, 4, 1), opset=16),
    # indices computed at run time (dynamo's as_strided from the batch size): scattered
    "gather_runtime_indices_opset16": Case(
        [_node("Gather", ["x", "i"], ["g"]), _node("Mul", ["g", "g"])],
        {"x": _normal(4, 2), "i": _i64(0, 3, 3, -1)}, opset=16),
    # layer normalisation
    "layer_norm_last_axis_all_grads": _layer_norm((2, 3, 5), -1, grads=True),
    "layer_norm_axis1_chw_eps": _layer_norm((2, 3, 2, 2), 1, epsilon=1e-2),
    "layer_norm_axis1_chw_all_grads": _layer_norm((2, 3, 2, 2), 1, grads=True),
    "layer_norm_no_bias": _layer_norm((2, 4, 3), -1, bias=False, grads=True),
    "layer_norm_axis_minus2_broadcast_scale": _layer_norm((2, 3, 4), -2, scale_shape=(1, 4),
                                                          grads=True),
    "layer_norm_axis0": _layer_norm((3, 4), 0),
    "layer_norm_stats_outputs_unused": _layer_norm((2, 3, 4), -1, stats=True),
    "layer_norm_stats_used": _layer_norm_stats_used(),
    "layer_norm_channels_last": _layer_norm_channels_last(),
    "layer_norm_decomposed": _layer_norm_decomposed(13),
    "layer_norm_decomposed_opset18": _layer_norm_decomposed(18),
    # smooth pointwise functions
    "erf": _unary("Erf", 1.5 * _normal(2, 3, 4)),
    "gelu": _unary("Gelu", 2 * _normal(2, 3, 4), opset=20),
    "gelu_none": _unary("Gelu", 2 * _normal(2, 5), opset=20, approximate="none"),
    "gelu_tanh": _unary("Gelu", 2 * _normal(2, 3, 4), opset=20, approximate="tanh"),
    "gelu_decomposed": _gelu_decomposed(),
    "sqrt": _unary("Sqrt", _positive(2, 3, 4)),
    "reciprocal": _unary("Reciprocal", _away(_normal(2, 3, 4), 0.0, margin=0.3)),
    "exp": _unary("Exp", _normal(2, 3, 4)),
    "log": _unary("Log", _positive(2, 3, 4)),
    "abs": _unary("Abs", _away(_normal(2, 3, 4), 0.0)),
    "pow_square": _pow(_normal(2, 3, 4), np.array(2.0)),
    "pow_cube_negative_base": _pow(_normal(2, 3, 4), np.array(3.0)),
    "pow_half": _pow(_positive(2, 3, 4), np.array(0.5)),
    "pow_one": _pow(_normal(2, 3), np.array([1.0])),
    "pow_zero": _pow(_normal(2, 3), np.array(0.0)),
    "pow_int64_exponent_opset15": _pow(_normal(2, 3, 4), np.array(3, dtype=np.int64), opset=15),
    "pow_per_channel_exponents": _pow(_positive(2, 3, 4), RNG.uniform(-1, 3, size=(3, 1))),
    "pow_exponent_grad": _pow(_positive(2, 3, 4), RNG.uniform(-1, 3, size=(3, 1)),
                              wrt_exponent=True),
    # variadic and selecting arithmetic
    "sum_variadic_broadcast": _variadic("Sum", [(2, 3, 4), (3, 1), (4,)]),
    "sum_single": _variadic("Sum", [(2, 3)]),
    "mean_variadic_broadcast": _variadic("Mean", [(2, 3, 4), (1, 3, 1), (2, 1, 4)]),
    "max_binary_broadcast": _variadic("Max", [(2, 3, 4), (3, 1)], _distinct),
    "max_variadic": _variadic("Max", [(2, 3, 4), (2, 3, 4), (4,)], _distinct),
    "min_binary_broadcast": _variadic("Min", [(2, 3, 4), (1, 4)], _distinct),
    "min_variadic": _variadic("Min", [(3, 4), (2, 3, 4), (2, 1, 1)], _distinct),
    "max_single": _variadic("Max", [(2, 3)]),
    # Max(x, x) = x: the tie splits the gradient, which adds back to gy.
    "max_tie_same_input": Case([_node("Max", ["x", "x"])], {"x": _normal(2, 3)}),
    "max_relu_like": Case([_node("Max", ["x", "zero"])], {"x": _away(_normal(2, 3, 4), 0.0)},
                          {"zero": np.array(0.0)}),
    "where_broadcast": _where((2, 3, 4), (3, 1), (2, 1, 4)),
    "where_same_shapes": _where((2, 3), (2, 3), (2, 3)),
    "where_scalar_branch": _where((2, 3, 4), (), (3, 4)),
    "mod_fmod": _mod(),
    # further reductions
    **{f"{op.lower()}_keep{k}_opset{o}": _reduce(op, o, k, axes, REDUCE_INPUTS[op]())
       for op in REDUCE_INPUTS for o in (13, 18) for k, axes in ((0, [1, -1]), (1, [2]))},
    "reducel2_all_axes": Case([_node("ReduceL2", ["x"], keepdims=0)], {"x": _normal(2, 3)}),
    "reducemax_all_axes_keep": Case([_node("ReduceMax", ["x"])], {"x": _distinct(2, 3, 2)}),
    # tiling
    "tile": _tile((2, 3, 2), [1, 2, 3]),
    "tile_leading": _tile((2, 1, 3), [3, 4, 1]),
    "tile_ones": _tile((2, 3), [1, 1]),
}

CASES = {**CONV, **MAXPOOL, **AVGPOOL, **BROADCAST, **OTHER}
# Float32 runs in ONNX Runtime, for a spread of ops.
ORT_IDS = [name for name, case in CASES.items() if case.ort]


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_vjp_equals_finite_differences(case: Case) -> None:
    seed, grads = _gradients(case)
    for name, grad in zip(case.wrt, grads):
        expected = _fd(case, name, seed)
        assert grad.shape == expected.shape
        np.testing.assert_allclose(grad, expected, rtol=case.tol, atol=case.tol, err_msg=name)


@pytest.mark.parametrize("name", ORT_IDS)
def test_float32_onnxruntime_matches_float64(name: str) -> None:
    case = CASES[name]
    seed, exact = _gradients(case)
    _, fast = _gradients(case, np.float32, engine="ort", seed=seed)
    for w, g64, g32 in zip(case.wrt, exact, fast):
        assert g32.shape == g64.shape
        err = np.abs(g32 - g64).max() / max(np.abs(g64).max(), 1e-12)
        assert err <= 1e-4, f"{name}/{w}: relative error {err:.2e}"


def test_gemm_beta_float64() -> None:
    test_vjp_equals_finite_differences(_gemm(0, 1, beta=1.3))


def test_gemm_beta_float32_onnxruntime() -> None:
    case = _gemm(1, 0, beta=1.3)
    seed = np.random.default_rng(7).normal(size=(3, 5))
    _, grads = _gradients(case, np.float32, engine="ort", seed=seed)
    for name, grad in zip(case.wrt, grads):
        np.testing.assert_allclose(grad, _fd(case, name, seed), rtol=1e-4, atol=1e-5)


# What the compiled graphs look like: a symbolic batch axis.
SYMBOLIC_BATCH = sorted({
    name for name in CASES
    if name.split("_")[0] in {"conv", "conv1d", "conv3d", "k2s2", "k3s2p1", "k3s1", "ceil",
                              "dilation2", "same", "1d", "avg", "relu", "leaky", "prelu",
                              "clip", "hard", "softmax", "concat", "split", "slice", "pad",
                              "resize", "global", "reducemean", "reducesum", "flatten",
                              "transpose", "batch", "expand"}
    or name in {"gather_vector_indices", "gather_matrix_indices_axis1", "add_c11",
                "mul_1c11", "sub_scalar", "div_c11", "shape_arithmetic",
                "layer_norm_last_axis_all_grads", "layer_norm_axis1_chw_all_grads",
                "layer_norm_channels_last", "layer_norm_decomposed_opset18", "gelu_tanh",
                "gelu_decomposed", "where_scalar_branch", "max_binary_broadcast",
                "reducel2_keep0_opset18", "reducemax_keep1_opset18", "pow_exponent_grad",
                "mod_fmod", "gather_flat", "gather_flat_repeats_opset16"}
} - {
    "expand",  # x's first axis is broadcast, not a batch
    "slice_all_axes_default",  # slices the batch axis
    "pad_constant_axes_opset18",  # shape inference renames the batch axis at Pad-18
    "resize_nearest_down_sizes", "resize_linear_sizes_down",  # constant sizes fix the batch
})


@pytest.mark.parametrize("name", SYMBOLIC_BATCH)
def test_symbolic_batch_axis(name: str) -> None:
    case = CASES[name]
    seed, exact = _gradients(case)
    model = vjp(case.model(np.float32, batch="N"), case.of, list(case.wrt))
    session = make_session(model, CPU, 1)
    feeds = {k: np.asarray(v, dtype=np.float32) if v.dtype == np.float64 else v
             for k, v in case.inputs.items()}
    feeds[SEED] = seed.astype(np.float32)
    fast = session.run([grad_name(w) for w in case.wrt], feeds)
    for w, g64, g32 in zip(case.wrt, exact, fast):
        err = np.abs(g32 - g64).max() / max(np.abs(g64).max(), 1e-12)
        assert err <= 1e-4, f"{name}/{w}: relative error {err:.2e}"


def test_every_rule_is_covered() -> None:
    tested = {n.op_type for case in CASES.values() for n in case.nodes}
    untested = set(RULES) - tested - {
        # the same no-gradient rule as Shape, Size, Greater and ConstantOfShape
        "Constant", "Range", "NonZero", "EyeLike", "Equal", "Less", "LessOrEqual",
        "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin",
        "Floor", "Ceil", "Round", "Sign",
    }
    assert not untested


# Guided backprop ------------------------------------------------------------------------

GUIDED = {
    "relu": (OTHER["relu"], None),
    "relu_blocked": (OTHER["relu_blocked"], None),
    "leaky_relu": (OTHER["leaky_relu"], None),
    "prelu": (OTHER["prelu_per_channel"], None),
    "clip_relu6": (OTHER["clip_relu6"], 6.0),
    "clip_relu6_blocked": (OTHER["clip_relu6_blocked"], 6.0),
}


@pytest.mark.parametrize(("case", "high"), list(GUIDED.values()), ids=list(GUIDED))
def test_guided_rectifiers(case: Case, high: float | None) -> None:
    seed, (grad,) = _gradients(case, guided=True)
    x = case.inputs["x"]
    expected = np.maximum(seed, 0) * (x > 0)
    if high is not None:
        expected = expected * (x < high)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12)
    _, (fast,) = _gradients(case, np.float32, guided=True, engine="ort", seed=seed)
    np.testing.assert_allclose(fast, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "conv_s2_pads", "clip_min_only", "hard_swish",
                                  "k3s2p1_overlap_opset13", "avg_k3s2_pads_include"])
def test_guided_keeps_other_derivatives(name: str) -> None:
    case = CASES[name]
    seed, plain = _gradients(case)
    _, guided = _gradients(case, guided=True, seed=seed)
    np.testing.assert_allclose(guided[0], plain[0], rtol=1e-12, atol=1e-12)


def test_guided_chain_masks_each_rectifier() -> None:
    """Conv -> Relu -> Conv: guided masks at the Relu only, the Convs keep their gradient."""
    w1, w2 = _normal(3, 2, 3, 3), _normal(2, 3, 3, 3)
    nodes = [_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), _node("Relu", ["h"], ["r"]),
             _node("Conv", ["r", "w2"], pads=[1, 1, 1, 1])]
    case = Case(nodes, {"x": _normal(1, 2, 5, 5)}, {"w1": w1, "w2": w2})
    seed, (grad,) = _gradients(case, guided=True)
    h = _run_ref(case.model(), ["h"], case.inputs)[0]
    probe = Case([_node("Conv", ["r", "w2"], pads=[1, 1, 1, 1])], {"r": np.maximum(h, 0)},
                 {"w2": w2}, wrt=("r",))
    _, (g_r,) = _gradients(probe, seed=seed)
    masked = np.maximum(g_r, 0) * (h > 0)
    first = Case([_node("Conv", ["x", "w1"], pads=[1, 1, 1, 1])], case.inputs, {"w1": w1})
    _, (expected,) = _gradients(first, seed=masked)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)


def _channel_scalings(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The generated per-channel scalings: Muls by a (1, C, 1, 1) constant, depthwise 1×1
    Convs other than the rectifier masks (those feed a HardSigmoid)."""
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    masks = {n.input[0] for n in model.graph.node if n.op_type == "HardSigmoid"}
    found = []
    for n in model.graph.node:
        if not n.output[0].startswith("xai/"):
            continue
        values = [consts[i] for i in n.input if i in consts]
        if n.op_type == "Mul" and any(v.ndim == 4 and v.shape[0] == 1 and v.size > 1
                                      for v in values):
            found.append(n)
        if (n.op_type == "Conv" and n.output[0] not in masks and values
                and values[0].shape[1:] == (1, 1, 1) and values[0].shape[0] > 1):
            found.append(n)
    return found


@pytest.mark.parametrize("name", ["batch_norm_relu_conv", "batch_norm_relu_conv_negative",
                                  "batch_norm_relu_conv_blocked"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_batch_norm_gradient_folds_into_the_conv(name: str, guided: bool) -> None:
    """BN → Relu → Conv: the BN's per-channel factor becomes part of the Conv's flipped
    weights, except under guided backprop with a negative factor (the guided Relu would
    then pass the wrong sign), where it stays; the gradient is the same either way."""
    case = CASES[name]
    for dtype in (np.float64, np.float32):
        model = vjp(case.model(dtype), case.of, ["x"], guided=guided)
        kept = guided and "negative" in name
        assert len(_channel_scalings(model)) == int(kept), dtype
    seed, (grad,) = _gradients(case, guided=guided)
    n = _run_ref(case.model(), ["n"], case.inputs)[0]
    probe = Case([case.nodes[-1]], {"r": np.maximum(n, 0)}, {"w": case.inits["w"]}, wrt=("r",))
    _, (g_r,) = _gradients(probe, seed=seed)
    factor = case.inits["s"] / np.sqrt(case.inits["v"] + 1e-3)
    passed = np.maximum(g_r, 0) if guided else g_r
    expected = passed * (n > 0) * factor[None, :, None, None]
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
    _, (fast,) = _gradients(case, np.float32, guided=guided, engine="ort", seed=seed)
    np.testing.assert_allclose(fast, expected, rtol=1e-4, atol=1e-5)


def test_fold_leaves_the_forward_pass_alone() -> None:
    """A per-channel Mul after a Conv and a Relu in the model itself is not folded: the
    forward pass keeps its bits; only generated gradient nodes are."""
    rng = np.random.default_rng(62)
    nodes = [_node("Conv", ["x", "w"], ["c"]), _node("Relu", ["c"], ["r"]),
             _node("Mul", ["r", "k"])]
    case = Case(nodes, {"x": rng.normal(size=(1, 3, 4, 4))},
                {"w": rng.normal(size=(3, 3, 1, 1)), "k": rng.uniform(0.5, 1, (1, 3, 1, 1))})
    model = vjp(case.model(np.float32), "y", ["x"])
    forward = [n for n in model.graph.node if not n.output[0].startswith("xai/")]
    assert [n.op_type for n in forward] == ["Conv", "Relu", "Mul"]
    assert {i.name for i in model.graph.initializer} >= {"w", "k"}


# ONNX Runtime's blocked layout ----------------------------------------------------------


def _every_kind_of_float32() -> np.ndarray:
    """16 channels holding zeros of both signs, subnormals, the smallest normals, values
    near the 2^-127 step of the blocked mask, ordinary and huge values and infinities."""
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    kinds = [0.0, -0.0, tiny, -tiny, 3 * tiny, 2.0**-140, 2.0**-128, 2.0**-127, -2.0**-127,
             2.0**-126, 1e-30, 0.25, 1.0, 5.999999, 6.0, 6.5, 3e38, -3e38, np.inf, -np.inf,
             -1.0, -0.5, 2.0, 1e20]
    values = np.resize(np.array(kinds, dtype=np.float32), 16 * 2 * 3)
    return np.random.default_rng(3).permutation(values).reshape(1, 16, 2, 3)


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("high", [None, 6.0], ids=["relu", "clip_relu6"])
def test_blocked_rectifier_masks_are_exact(guided: bool, high: float | None) -> None:
    """The mask of a 16-channel float32 rectifier (a depthwise Conv by 2^127 and a
    HardSigmoid of slope 2^127) is exactly [x > 0] (and [x < max]) for every float32."""
    x = _every_kind_of_float32()
    case = (_unary("Relu", x.astype(np.float64)) if high is None
            else _clip(x.astype(np.float64), 0.0, high))
    model = vjp(case.model(np.float32), "y", ["x"], guided=guided)
    ops = {n.op_type for n in model.graph.node}
    assert {"HardSigmoid", "Conv"} <= ops and "Greater" not in ops
    seed = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    (grad,) = make_session(model, CPU, 1).run([grad_name("x")], {"x": x, SEED: seed})
    passed = np.maximum(seed, 0) if guided else seed
    expected = passed * (x > 0) * (x < high if high is not None else 1)
    np.testing.assert_array_equal(grad, expected)


def test_gradient_parts_are_summed_by_add_or_sum() -> None:
    """A tensor read twice gets its two gradient parts added by one Add (ONNX Runtime's CPU
    Sum runs on one thread, its Add on the whole pool), one read three times by one Sum;
    the gradient equals finite differences either way, in ORT's float32 too."""
    case = Case([_node("Mul", ["x", "x"], ["t"]), _node("Add", ["t", "x"], ["u"]),
                 _node("Mul", ["t", "u"])], {"x": _normal(2, 3)})
    graph = vjp(case.model(), case.of, list(case.wrt)).graph
    parts = {n.op_type: len(n.input) for n in graph.node if "/acc" in n.output[0]}
    assert parts == {"Add": 2, "Sum": 3}  # t's two parts, x's three
    seed, grads = _gradients(case)
    np.testing.assert_allclose(grads[0], _fd(case, "x", seed), rtol=1e-6, atol=1e-6)
    _, fast = _gradients(case, np.float32, engine="ort", seed=seed)
    np.testing.assert_allclose(fast[0], grads[0], rtol=1e-5, atol=1e-5)


def test_gradients_state_their_batch_axis() -> None:
    """Every gradient is declared with its tensor's shape, the batch axis named as in the
    model: shape inference alone loses the name at the rules' Shape-fed Reshapes."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 16, 4, 4))
    nodes = [_node("Relu", ["x"], ["r"]), _node("GlobalAveragePool", ["r"], ["p"]),
             _node("Flatten", ["p"], ["f"]), _node("Gemm", ["f", "w"], transB=1)]
    case = Case(nodes, {"x": x}, {"w": rng.normal(size=(3, 16))})
    model = vjp(case.model(np.float32, batch="N"), "y", ["x", "r"], guided=True)
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in model.graph.value_info}
    feeding = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    for tensor in ("x", "r"):
        assert declared[feeding[grad_name(tensor)]] == ["N", 16, 4, 4]


def test_declared_gradient_shapes_agree_with_shape_inference() -> None:
    """No declared gradient type contradicts what ONNX's strict shape inference derives,
    over every case whose forward model passes it."""
    checked = 0
    for case in CASES.values():
        forward = case.model(np.float32 if case.ort else np.float64)
        try:
            onnx.shape_inference.infer_shapes(forward, strict_mode=True)
        except onnx.shape_inference.InferenceError:
            continue  # the case's own declared output type is not the inferred one
        for guided in (False, True):
            model = vjp(forward, case.of, list(case.wrt), guided=guided)
            onnx.shape_inference.infer_shapes(model, strict_mode=True)
        checked += 1
    assert checked >= len(CASES) - 2


def _optimised_blocked(model: onnx.ModelProto, tmp_path) -> onnx.GraphProto:  # type: ignore[no-untyped-def]
    """``model`` as ONNX Runtime optimises it for this CPU, which must use the blocked NCHWc
    layout (ONNX Runtime's x86-64 kernels, what the service is built and measured on)."""
    optimised = tmp_path / "optimised.onnx"
    make_session(model, CPU, 1)  # creates the process-wide thread pool the next one shares
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
    graph = onnx.load(str(optimised)).graph
    assert any(n.domain == "com.microsoft.nchwc" for n in graph.node), (
        "ONNX Runtime optimised nothing into its blocked layout")
    return graph


def test_guided_backward_stays_in_the_blocked_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Conv → BN → Relu twice, a residual Add, a last Conv and a Flatten (whose gradient is
    a Reshape to a Shape), 16 channels, batch axis symbolic: in the graph ONNX Runtime
    optimises, no elementwise op of the guided backward pass reads a tensor reordered back
    to NCHW. With the masks as Cast(Greater), or without the gradients' declared shapes,
    each rectifier's Mul had both inputs reordered to NCHW and its output back."""
    rng = np.random.default_rng(6)
    w1, w2, w3 = (rng.normal(size=(16, 16, k, k)) * 0.2 for k in (3, 1, 3))
    bn = {f"{k}{i}": rng.normal(size=16) for i in (1, 2) for k in "sbm"}
    bn |= {f"v{i}": rng.uniform(0.5, 2, 16) for i in (1, 2)}
    nodes = [_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             _node("BatchNormalization", ["c1", "s1", "b1", "m1", "v1"], ["n1"]),
             _node("Relu", ["n1"], ["r1"]),
             _node("Conv", ["r1", "w2"], ["c2"]),
             _node("BatchNormalization", ["c2", "s2", "b2", "m2", "v2"], ["n2"]),
             _node("Relu", ["n2"], ["r2"]), _node("Add", ["r2", "r1"], ["a"]),
             _node("Conv", ["a", "w3"], ["c3"], pads=[1, 1, 1, 1]), _node("Flatten", ["c3"])]
    case = Case(nodes, {"x": rng.normal(size=(1, 16, 6, 6))},
                {"w1": w1, "w2": w2, "w3": w3, **bn}, opset=15)
    model = vjp(case.model(np.float32, batch="N"), "y", ["x"], guided=True)
    graph = _optimised_blocked(model, tmp_path)
    producer = {o: n for n in graph.node for o in n.output}
    elementwise = [n for n in graph.node if n.op_type in ("Mul", "Relu", "Add", "Sum")]
    assert sum(n.op_type == "Mul" for n in elementwise) == 2  # one per rectifier
    for node in elementwise:
        sources = [producer[i].op_type for i in node.input if i in producer]
        assert "ReorderOutput" not in sources, (node.op_type, sources)

@pytest.mark.parametrize("name", sorted(n for n in CONV if "_phase_" in n or "_blocked_" in n))
def test_strided_conv_gradient_forms(name: str) -> None:
    """Which form a strided convolution's input gradient takes: per-phase convolutions
    interleaved by DepthToSpace for dense kernels spanning more than two strides (one
    convolution for every phase where the input is not blocked, a stem's), else one
    ConvTranspose; in float32 either ends in the depthwise Conv by ones that returns the
    gradient to ONNX Runtime's blocked layout where the input is blocked."""
    merged = "_stem_" in name  # the input is not blocked: one convolution for all phases
    for dtype, extra in ((np.float64, 0), (np.float32, 0 if merged else 1)):
        ops = [n.op_type for n in vjp(CASES[name].model(dtype), "y", ["x"]).graph.node]
        phased = "_phase_" in name
        assert ("DepthToSpace" in ops, "ConvTranspose" in ops) == (phased, not phased)
        strides = next(n for n in CASES[name].nodes if n.op_type == "Conv").attribute
        stride = next(a.ints[0] for a in strides if a.name == "strides")
        phase_convs = 1 if merged else stride ** 2 if phased else 0
        assert ops.count("Conv") == 1 + phase_convs + extra


def test_strided_gradients_stay_in_the_blocked_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A ResNet-style downsampling block (3×3 and 1×1 convolutions at stride 2 beside each
    other, an Add, a Relu) and a 5×5 stride-2 convolution, 16 channels, batch axis
    symbolic, a last Conv before the Flatten (as in the test above): in the guided graph
    ONNX Runtime optimises, no elementwise op reads a tensor reordered back to NCHW. With
    ConvTranspose's output fed on as it is, the Sum of the two branches' gradients and every
    mask Mul after it ran in NCHW."""
    rng = np.random.default_rng(8)
    weights = {"w1": rng.normal(size=(16, 16, 3, 3)) * 0.2,
               "w2": rng.normal(size=(32, 16, 3, 3)) * 0.2,
               "wd": rng.normal(size=(32, 16, 1, 1)) * 0.2,
               "w3": rng.normal(size=(16, 32, 5, 5)) * 0.1,
               "w4": rng.normal(size=(16, 16, 1, 1)) * 0.2}
    nodes = [_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), _node("Relu", ["c1"], ["r1"]),
             _node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1] * 4),
             _node("Relu", ["c2"], ["r2"]),
             _node("Conv", ["r1", "wd"], ["d"], strides=[2, 2]), _node("Add", ["r2", "d"], ["a"]),
             _node("Relu", ["a"], ["r3"]),
             _node("Conv", ["r3", "w3"], ["c3"], strides=[2, 2], pads=[2] * 4),
             _node("Relu", ["c3"], ["r4"]), _node("Conv", ["r4", "w4"], ["c4"]),
             _node("Flatten", ["c4"])]
    case = Case(nodes, {"x": rng.normal(size=(1, 16, 12, 12))}, weights)
    model = vjp(case.model(np.float32, batch="N"), "y", ["x"], guided=True)
    graph = _optimised_blocked(model, tmp_path)
    assert {"ConvTranspose", "DepthToSpace"} <= {n.op_type for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    elementwise = [n for n in graph.node if n.op_type in ("Mul", "Relu", "Add", "Sum")]
    assert sum(n.op_type == "Mul" for n in elementwise) == 4  # one per rectifier
    for node in elementwise:
        sources = [producer[i].op_type for i in node.input if i in producer]
        assert not {"ReorderOutput", "ConvTranspose", "DepthToSpace"} & set(sources), (
            node.op_type, sources)


# Refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "message"), [
    (Case([_node("Conv", ["x", "w"], strides=[2, 2])], {"x": _normal(1, 2, 5, 5),
          "w": _normal(3, 2, 3, 3)}, wrt=("x", "w")), "gradients of the weights"),
    (_resize((1, 2, 3, 4), [1, 1, 2, 2], coordinate_transformation_mode="tf_crop_and_resize"),
     "tf_crop_and_resize"),
    (Case([_node("Gather", ["x", "i"])], {"x": _normal(3, 2), "i": _i64(0, 1)}),
     "needs constant indices"),
    # The rules are the standard ops': another domain's op of the same name has none.
    (Case([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="fused")],
          {"x": _normal(2, 2)}, domains=("com.microsoft",)),
     r"no gradient rule for op type\(s\) com.microsoft:Gelu; nodes: com.microsoft:Gelu \(fused\)"),
    (Case([_node("Tile", ["x", "r"])], {"x": _normal(2, 2), "r": _i64(2, 1)}),
     "repeats computed at run time"),
    (Case([_node("ReduceL2", ["x", "axes"], noop_with_empty_axes=1)], {"x": _normal(2, 3)},
          {"axes": _i64()}, opset=18), "over no axes"),
], ids=["conv_weight_grad", "resize_tf_crop", "gather_runtime_indices", "other_domain",
        "tile_runtime_repeats", "reduce_noop"])
def test_unsupported_cases_are_refused(case: Case, message: str) -> None:
    with pytest.raises(CompileError, match=message):
        vjp(case.model(), case.of, list(case.wrt))


def test_gather_on_a_runtime_size_needs_what_scattering_needs() -> None:
    for indices, opset in ((_i64(0, -1), 16), (_i64(0, 4, 4), 13)):
        case = _gather_flat(indices, opset)
        with pytest.raises(CompileError, match="axis 0 of 'flat' has no static size"):
            vjp(case.model(batch="N"), case.of, list(case.wrt))


def test_numpy_conv_transpose_matches_onnxruntime() -> None:
    """The reference-evaluator override used above agrees with ORT's ConvTranspose."""
    node = _node("ConvTranspose", ["x", "w"], group=2, strides=[2, 3], dilations=[1, 2],
                 pads=[1, 0, 0, 2], output_padding=[1, 2])
    case = Case([node], {"x": _normal(1, 4, 3, 4)}, {"w": _normal(4, 3, 2, 3)})
    (ours,) = _run_ref(case.model(), ["y"], case.inputs)
    session = make_session(case.model(np.float32), CPU, 1)
    (theirs,) = session.run(["y"], {"x": case.inputs["x"].astype(np.float32)})
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_generated_graphs_pass_the_full_checker() -> None:
    for name in ["conv_s2_pads", "conv_weights_from_node", "k3s2p1_overlap_opset13",
                 "k3s2p1_overlap_opset18", "avg_ceil_exclude", "slice_negative_steps",
                 "pad_reflect", "resize_linear_x2_half_pixel", "split_3_one_unused",
                 "gather_matrix_indices", "cast_float32_to_float64", "hard_swish",
                 "layer_norm_stats_used", "layer_norm_decomposed_opset18", "gelu_tanh",
                 "gelu_none", "pow_exponent_grad", "pow_int64_exponent_opset15",
                 "where_broadcast", "min_variadic", "tile", "mod_fmod",
                 "reducel2_keep0_opset18", "reducemax_keep1_opset13"]:
        case = CASES[name]
        model = vjp(case.model(), case.of, list(case.wrt))
        onnx.checker.check_model(model, full_check=True)


def test_broadcast_decided_when_the_graph_runs() -> None:
    """Two inputs whose batch axes have unrelated symbolic sizes: whether one of them is
    broadcast is known only at run time, and the gradient sums over it exactly then."""
    graph = helper.make_graph(
        [_node("Add", ["x", "w"], ["s"]), _node("Mul", ["s", "s"])], "late",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, ["M", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = make_session(vjp(model, "y", ["x", "w"]), CPU, 1)
    x = _normal(4, 3).astype(np.float32)
    for w in (_normal(1, 3), _normal(4, 3)):
        w = w.astype(np.float32)
        seed = _normal(4, 3).astype(np.float32)
        gx, gw = session.run([grad_name("x"), grad_name("w")], {"x": x, "w": w, SEED: seed})
        full = 2 * (x + w) * seed  # d<seed, (x + w)²>
        np.testing.assert_allclose(gx, full, rtol=1e-5)
        np.testing.assert_allclose(gw, full.sum(axis=0, keepdims=True) if len(w) == 1
                                   else full, rtol=1e-5)
