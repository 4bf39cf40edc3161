"""VJP rules for global pooling and reductions.

Every reduction's gradient is gy brought back to x's rank (Unsqueeze when keepdims=0)
times the local derivative, which broadcasts it over the reduced axes: 1 (ReduceSum), 1/n
(ReduceMean), 2x (ReduceSumSquare), x/y (ReduceL2), sign(x) (ReduceL1), e^(x−y)
(ReduceLogSumExp), and the tie-shared indicator of the extremum (ReduceMax, ReduceMin).
"""

from __future__ import annotations

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def reduced_count(b: VjpBuilder, x: str, axes: list[int]) -> str:
    """The number of elements reduced over ``axes`` of x, as a float scalar tensor."""
    shape = b.shape(x)
    if shape is not None and all(isinstance(shape[a], int) for a in axes):
        return b.float_const(float(np.prod([shape[a] for a in axes])), x)
    dims = b.op("Gather", [b.op("Shape", [x]), b.const(np.array(axes, dtype=np.int64))], axis=0)
    prod = b.reduce("ReduceProd", dims, [0], keepdims=False)
    return b.op("Cast", [prod], to=b.index.elem_type(x) or 1)


def global_average_pool(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                        needs: list[bool]) -> Grads:
    x, gy = node.input[0], gys[0]
    assert gy is not None
    spatial = list(range(2, b.rank(x)))
    scaled = b.op("Div", [gy, reduced_count(b, x, spatial)])
    return [b.op("Expand", [scaled, b.shape_of(x)], hint="grad")]


def global_max_pool(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    # The gradient goes to the maximum; ties share it equally (a subgradient, and what a
    # finite difference sees on average).
    x, y, gy = node.input[0], node.output[0], gys[0]
    assert gy is not None
    hit = b.op("Cast", [b.op("Equal", [x, y])], to=b.index.elem_type(x) or 1)
    spatial = list(range(2, b.rank(x)))
    ties = b.reduce("ReduceSum", hit, spatial, keepdims=True)
    return [b.op("Mul", [hit, b.op("Div", [gy, ties])], hint="grad")]


def _reduce_axes(b: VjpBuilder, node: onnx.NodeProto) -> list[int] | None:
    """The normalised reduction axes, or None for 'all axes'."""
    rank = b.rank(node.input[0])
    axes_attr = attr(node, "axes")
    if axes_attr is not None:
        axes = list(axes_attr)  # type: ignore[call-overload]
    elif len(node.input) > 1 and node.input[1]:
        value = b.index.constant(node.input[1])
        if value is None:
            raise CompileError(
                f"{node.op_type} node {node.name!r}: axes computed at run time are not supported"
            )
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = []
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):  # type: ignore[arg-type]
            return []
        return None
    return sorted(a % rank for a in axes)


def _reduce(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, mean: bool) -> Grads:
    x, gy = node.input[0], gys[0]
    assert gy is not None
    axes = _reduce_axes(b, node)
    if axes is None:
        axes = list(range(b.rank(x)))
    if not axes:  # noop reduction
        return [gy] + [None] * (len(node.input) - 1)
    if not int(attr(node, "keepdims", 1)):  # type: ignore[arg-type]
        gy = b.unsqueeze(gy, axes)
    if mean:
        gy = b.op("Div", [gy, reduced_count(b, x, axes)])
    return [b.op("Expand", [gy, b.shape_of(x)], hint="grad")] + [None] * (len(node.input) - 1)


def reduce_mean(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    return _reduce(b, node, gys, mean=True)


def reduce_sum(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    return _reduce(b, node, gys, mean=False)


def _kept(b: VjpBuilder, node: onnx.NodeProto, t: str) -> tuple[str, list[int]]:
    """A reduced tensor (the output or its gradient) at x's rank, and the reduced axes."""
    x = node.input[0]
    axes = _reduce_axes(b, node)
    if axes is None:
        axes = list(range(b.rank(x)))
    if not axes:
        # The spec leaves what e.g. ReduceSumSquare does then unclear; no exporter writes it.
        raise CompileError(f"{node.op_type} node {node.name!r}: a reduction over no axes "
                           "(noop_with_empty_axes) is not supported")
    if not int(attr(node, "keepdims", 1)):  # type: ignore[arg-type]
        t = b.unsqueeze(t, axes)
    return t, axes


def _grad(node: onnx.NodeProto, gx: str) -> Grads:
    return [gx] + [None] * (len(node.input) - 1)


def reduce_sum_square(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                      needs: list[bool]) -> Grads:
    """y = Σ x²: gx = 2x · gy."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    g, _ = _kept(b, node, gy)
    return _grad(node, b.op("Mul", [b.op("Mul", [x, b.float_const(2.0, x)]), g], hint="grad"))


def reduce_l2(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = √Σ x²: gx = gy · x / y; 0 where y = 0 (then x = 0 there), as torch's norm does."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    g, _ = _kept(b, node, gy)
    y, _ = _kept(b, node, node.output[0])
    zero = b.float_const(0.0, x)
    safe = b.op("Where", [b.op("Equal", [y, zero]), b.float_const(1.0, x), y])
    return _grad(node, b.op("Mul", [x, b.op("Div", [g, safe])], hint="grad"))


def reduce_l1(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = Σ |x|: gx = gy · sign(x) (0 at x = 0)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    g, _ = _kept(b, node, gy)
    return _grad(node, b.op("Mul", [b.op("Sign", [x]), g], hint="grad"))


def reduce_log_sum_exp(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                       needs: list[bool]) -> Grads:
    """y = ln Σ eˣ: gx = gy · e^(x − y) (the softmax over the reduced axes)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    g, _ = _kept(b, node, gy)
    y, _ = _kept(b, node, node.output[0])
    return _grad(node, b.op("Mul", [b.op("Exp", [b.op("Sub", [x, y])]), g], hint="grad"))


def reduce_extremum(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                    needs: list[bool]) -> Grads:
    """ReduceMax / ReduceMin: gy to the extremum, ties sharing it (as GlobalMaxPool)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    g, axes = _kept(b, node, gy)
    y, _ = _kept(b, node, node.output[0])
    hit = b.op("Cast", [b.op("Equal", [x, y])], to=b.index.elem_type(x) or 1)
    ties = b.reduce("ReduceSum", hit, axes, keepdims=True)
    return _grad(node, b.op("Mul", [hit, b.op("Div", [g, ties])], hint="grad"))
