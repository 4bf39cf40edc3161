"""VJP rules for global pooling and reductions."""

from __future__ import annotations

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def _count(b: VjpBuilder, x: str, axes: list[int]) -> str:
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
    scaled = b.op("Div", [gy, _count(b, x, spatial)])
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
        gy = b.op("Div", [gy, _count(b, x, axes)])
    return [b.op("Expand", [gy, b.shape_of(x)], hint="grad")] + [None] * (len(node.input) - 1)


def reduce_mean(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    return _reduce(b, node, gys, mean=True)


def reduce_sum(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    return _reduce(b, node, gys, mean=False)
