"""VJP rules for ops that only move values around: Identity, Dropout, reshapes, Transpose,
Expand, Tile, Concat, Split, Slice and Pad.

Slice with steps != 1 and Pad in reflect, edge and wrap modes are linear maps along each
axis; their gradients are MatMuls with the transposed 0/1 selection matrix, built with
NumPy from static shapes (:func:`along_axis`). Pad with negative pads is supported in
constant mode only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def _only_first(grad: str, node: onnx.NodeProto) -> Grads:
    return [grad] + [None] * (len(node.input) - 1)


def identity(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    # Dropout is the identity at inference; its optional mask output carries no gradient.
    assert gys[0] is not None
    return _only_first(gys[0], node)


def reshape(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    assert gys[0] is not None
    return _only_first(b.reshape_like(gys[0], node.input[0]), node)


def transpose(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    assert gys[0] is not None
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(b.rank(node.input[0]))))
    inverse = np.argsort(np.asarray(perm)).tolist()
    return [b.op("Transpose", [gys[0]], perm=inverse, hint="grad")]


INT64_MAX = int(np.iinfo(np.int64).max)


def along_axis(b: VjpBuilder, g: str, axis: int, rank: int, matrix: np.ndarray,
               like: str) -> str:
    """The VJP of y = M·x along ``axis`` (M: out × in, a constant): Mᵀ applied to ``g``."""
    m = np.asarray(matrix, dtype=b.np_dtype(like))
    if axis == rank - 1:
        return b.op("MatMul", [g, b.const(m)])
    if axis == rank - 2:
        return b.op("MatMul", [b.const(np.ascontiguousarray(m.T)), g])
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = b.op("MatMul", [b.op("Transpose", [g], perm=perm), b.const(m)])
    return b.op("Transpose", [moved], perm=np.argsort(perm).tolist())


def _constant_input(b: VjpBuilder, node: onnx.NodeProto, position: int,
                    what: str) -> np.ndarray | None:
    """The constant value of optional input ``position``; None when absent."""
    if len(node.input) <= position or not node.input[position]:
        return None
    value = b.index.constant(node.input[position])
    if value is None:
        raise CompileError(
            f"{node.op_type} node {node.name!r}: {what} computed at run time are not supported"
        )
    return value


def zeros_like(b: VjpBuilder, t: str) -> str:
    zero = helper.make_tensor("zero", b.index.elem_type(t) or onnx.TensorProto.FLOAT, [1], [0])
    return b.op("ConstantOfShape", [b.shape_of(t)], value=zero)


def expand(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    assert gys[0] is not None
    return _only_first(b.unbroadcast(gys[0], node.input[0], node.output[0]), node)


def tile(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = x repeated r_i times along each axis i (copy-major: y[t·d + j] = x[j]).

    Reshape gy to (r_0, d_0, r_1, d_1, ...) and sum the r axes. Needs constant repeats and
    static sizes on every repeated axis; at most one other axis may be symbolic (-1).
    """
    x, gy = node.input[0], gys[0]
    assert gy is not None
    repeats = _constant_input(b, node, 1, "repeats")
    assert repeats is not None
    reps = [int(r) for r in repeats.reshape(-1)]
    if all(r == 1 for r in reps):
        return _only_first(gy, node)
    shape = b.shape(x)
    if shape is None:
        raise CompileError(f"Tile node {node.name!r}: the shape of {x!r} is unknown")
    target: list[int] = []
    summed: list[int] = []
    for dim, r in zip(shape, reps):
        if r != 1:
            if not isinstance(dim, int):
                raise CompileError(f"Tile node {node.name!r}: a repeated axis of {x!r} has no "
                                   "static size")
            summed.append(len(target))
            target.append(r)
        target.append(dim if isinstance(dim, int) else -1)
    if target.count(-1) > 1:
        raise CompileError(f"Tile node {node.name!r}: {x!r} has more than one symbolic axis")
    split = b.op("Reshape", [gy, b.const(np.array(target, dtype=np.int64))])
    return _only_first(b.reduce("ReduceSum", split, summed, keepdims=False), node)


def concat(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Split gy along the axis with the inputs' sizes (static, else read with Shape)."""
    gy = gys[0]
    assert gy is not None
    axis = int(attr(node, "axis"))  # type: ignore[arg-type]
    axis %= b.rank(node.output[0])
    sizes = [b.shape(i) for i in node.input]
    if all(s is not None and isinstance(s[axis], int) for s in sizes):
        split = b.const(np.array([s[axis] for s in sizes], dtype=np.int64))  # type: ignore[index]
    else:
        position = b.const(np.array([axis], dtype=np.int64))
        split = b.op("Concat", [b.op("Gather", [b.op("Shape", [i]), position], axis=0)
                                for i in node.input], axis=0)
    parts = b.op_multi("Split", [gy, split], outputs=len(node.input), axis=axis)
    return [part if need else None for part, need in zip(parts, needs)]


def split(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Concat the output gradients (zeros for outputs without one) along the axis.

    The outputs' own shapes carry the sizes, so the ``split`` attribute (input from opset
    13) and opset 18's ``num_outputs`` need no reading.
    """
    axis = int(attr(node, "axis", 0))  # type: ignore[arg-type]
    parts = [g if g is not None else zeros_like(b, out) for out, g in zip(node.output, gys)]
    gx = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=axis, hint="grad")
    return _only_first(gx, node)


def _slice_indices(start: int, end: int, step: int, dim: int) -> tuple[int, list[int]]:
    """The clamped start and the indices ONNX Slice selects along an axis of size ``dim``."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return start, list(range(start, end, step))


def slice_(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Scatter gy back into zeros: Pad for step 1, a selection MatMul for other steps."""
    data, gy = node.input[0], gys[0]
    assert gy is not None
    starts = _constant_input(b, node, 1, "starts")
    ends = _constant_input(b, node, 2, "ends")
    assert starts is not None and ends is not None
    rank = b.rank(data)
    axes = _constant_input(b, node, 3, "axes")
    steps = _constant_input(b, node, 4, "steps")
    axes_list = [int(a) % rank for a in axes] if axes is not None else list(range(starts.size))
    steps_list = [int(s) for s in steps] if steps is not None else [1] * starts.size
    shape = b.shape(data)
    begin, end = [0] * rank, [0] * rank
    g = gy
    for axis, start, stop, step in zip(axes_list, starts.tolist(), ends.tolist(), steps_list):
        dim = shape[axis] if shape is not None else None
        if not isinstance(dim, int):
            if step == 1 and start >= 0 and stop >= 2**31 - 1:
                begin[axis] = int(start)
                continue
            raise CompileError(
                f"Slice node {node.name!r}: axis {axis} of {data!r} has no static size"
            )
        first, picked = _slice_indices(int(start), int(stop), step, dim)
        if step == 1:
            begin[axis], end[axis] = first, dim - first - len(picked)
        else:
            matrix = np.zeros((len(picked), dim))
            matrix[np.arange(len(picked)), picked] = 1.0
            g = along_axis(b, g, axis, rank, matrix, data)
    if any(begin) or any(end):
        g = b.op("Pad", [g, b.const(np.array(begin + end, dtype=np.int64))])
    return _only_first(g, node)


_NUMPY_PAD = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Constant mode: Slice gy back (zero-pad where the forward cropped). Reflect, edge,
    wrap: the transposed per-axis selection matrix, so mirrored parts add back."""
    data, gy = node.input[0], gys[0]
    assert gy is not None
    rank = b.rank(data)
    pads = _constant_input(b, node, 1, "pads")
    if pads is None:
        pads = np.asarray(attr(node, "pads", None) or [0] * (2 * rank))  # type: ignore[arg-type]
    axes_value = _constant_input(b, node, 3, "axes")
    axes = [int(a) % rank for a in axes_value] if axes_value is not None else list(range(rank))
    flat = [int(p) for p in pads.reshape(-1)]
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = flat[i], flat[len(axes) + i]
    mode = str(attr(node, "mode", "constant"))
    padded = [a for a in range(rank) if begin[a] or end[a]]
    if not padded:
        return _only_first(gy, node)

    if mode == "constant":
        g = b.op("Slice", [
            gy,
            b.const(np.array([max(begin[a], 0) for a in padded], dtype=np.int64)),
            b.const(np.array([-end[a] if end[a] > 0 else INT64_MAX for a in padded],
                             dtype=np.int64)),
            b.const(np.array(padded, dtype=np.int64)),
        ])
        if min(begin + end) < 0:
            refill = [max(-p, 0) for p in begin] + [max(-p, 0) for p in end]
            g = b.op("Pad", [g, b.const(np.array(refill, dtype=np.int64))])
        return _only_first(g, node)
    if mode not in _NUMPY_PAD:
        raise CompileError(f"Pad node {node.name!r}: mode {mode!r} is not supported")
    if min(begin + end) < 0:
        raise CompileError(
            f"Pad node {node.name!r}: negative pads are supported in constant mode only"
        )
    shape = b.shape(data)
    g = gy
    for axis in padded:
        dim = shape[axis] if shape is not None else None
        if not isinstance(dim, int):
            raise CompileError(
                f"Pad node {node.name!r}: mode {mode!r} needs a static size on axis {axis}"
            )
        matrix = np.pad(np.eye(dim), ((begin[axis], end[axis]), (0, 0)), mode=_NUMPY_PAD[mode])
        g = along_axis(b, g, axis, rank, matrix, data)
    return _only_first(g, node)
