"""VJP rules for shape arithmetic, comparisons, Cast and Gather.

Shape arithmetic (Shape, Size, ConstantOfShape, Range, NonZero, comparisons, Floor, Ceil,
...) carries no gradient: those rules return None for every input, so the walk stops
there. Floor, Ceil, Round and Sign are piecewise constant: their derivative is zero
wherever it exists.
"""

from __future__ import annotations

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.autodiff.shape import along_axis, zeros_like
from service.graph.onnx_graph import attr

Grads = list[str | None]

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

def no_gradient(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    return [None] * len(node.input)


def cast(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Between float types the gradient is cast back; anything else carries none.

    Also serves CastLike, whose second input only names the target type.
    """
    x, gy = node.input[0], gys[0]
    source, target = b.index.elem_type(x), b.index.elem_type(node.output[0])
    if gy is None or source not in FLOAT_TYPES or target not in FLOAT_TYPES:
        return [None] * len(node.input)
    gx = gy if source == target else b.op("Cast", [gy], to=source, hint="grad")
    return [gx] + [None] * (len(node.input) - 1)


def gather(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Float data, constant indices: y = M·x along the axis with a one-hot M (K × dim),
    so gx = Mᵀ·gy, which also sums repeated indices; where the axis has no static size, a
    ScatterND into zeros (:func:`_scatter_back`). Gathers on shapes carry nothing."""
    data, indices, gy = node.input[0], node.input[1], gys[0]
    if gy is None or not needs[0] or b.index.elem_type(data) not in FLOAT_TYPES:
        return [None, None]
    value = b.index.constant(indices)
    rank = b.rank(data)
    axis = int(attr(node, "axis", 0)) % rank  # type: ignore[arg-type]
    if value is None:
        if axis == 0 and b.opset >= 16:
            return [_scatter_runtime(b, data, indices, gy), None]
        raise CompileError(f"Gather node {node.name!r}: the gradient needs constant indices "
                           "(or, computed at run time, axis 0 and opset >= 16)")
    shape = b.shape(data)
    dim = shape[axis] if shape is not None else None
    if not isinstance(dim, int):
        scattered = _scatter_back(b, data, value, axis, gy)
        if scattered is None:
            raise CompileError(f"Gather node {node.name!r}: axis {axis} of {data!r} has no "
                               "static size (the gradient then needs axis 0, indices >= 0, "
                               "and opset >= 16 if one repeats)")
        return [scattered, None]
    flat = value.reshape(-1).astype(np.int64) % dim
    matrix = np.zeros((flat.size, dim))
    matrix[np.arange(flat.size), flat] = 1.0
    g = gy
    if value.ndim == 0:
        g = b.unsqueeze(g, [axis])
    elif value.ndim > 1:
        assert shape is not None
        if all(isinstance(d, int) for d in shape):
            target = b.const(np.array([*shape[:axis], flat.size, *shape[axis + 1:]],
                                      dtype=np.int64))
        else:
            gy_shape = b.op("Shape", [gy])
            target = b.op("Concat", [
                b.op("Slice", [gy_shape, b.const(np.array([0], dtype=np.int64)),
                               b.const(np.array([axis], dtype=np.int64))]),
                b.const(np.array([flat.size], dtype=np.int64)),
                b.op("Slice", [gy_shape, b.const(np.array([axis + value.ndim], dtype=np.int64)),
                               b.const(np.array([np.iinfo(np.int64).max], dtype=np.int64))]),
            ], axis=0)
        g = b.op("Reshape", [g, target])
    return [along_axis(b, g, axis, rank, matrix, data), None]


def _scatter_runtime(b: VjpBuilder, data: str, indices: str, gy: str) -> str:
    """gx for a Gather along axis 0 whose indices are computed at run time: gy added into
    zeros shaped like the data at those indices (ScatterND with reduction, opset 16).

    torch's dynamo export of ``as_strided`` computes the flat positions from the batch
    size (ConvNeXt's head), so they are known only when the graph runs. Negative indices
    count from the end, as Gather's do.
    """
    where = b.op("Cast", [indices], to=onnx.TensorProto.INT64)
    size = b.op("Gather", [b.op("Shape", [data]), b.const(np.array(0, dtype=np.int64))])
    negative = b.op("Cast", [b.op("Less", [where, b.const(np.array(0, dtype=np.int64))])],
                    to=onnx.TensorProto.INT64)
    where = b.op("Add", [where, b.op("Mul", [negative, size])])
    where = b.unsqueeze(where, [-1])
    return b.op("ScatterND", [zeros_like(b, data), where, gy], hint="grad", reduction="add")


def _scatter_back(b: VjpBuilder, data: str, indices: np.ndarray, axis: int,
                  gy: str) -> str | None:
    """gx for a Gather along axis 0 whose size is only known at run time: gy scattered
    into zeros shaped like the data at the (constant) indices, repeated ones adding up.

    torch's dynamo export writes ``as_strided`` as Reshape(x, [-1]) → Gather(indices): the
    flat size follows the batch axis, which the compiled graphs leave symbolic. Needs
    non-negative indices (their meaning does not depend on the size then) and, when an
    index repeats, ScatterND's reduction (opset 16).
    """
    flat = indices.reshape(-1)
    if axis != 0 or (flat < 0).any():
        return None
    repeats = np.unique(flat).size < flat.size
    if repeats and b.opset < 16:
        return None
    where = b.const(indices.astype(np.int64)[..., None])
    attrs = {"reduction": "add"} if repeats else {}
    return b.op("ScatterND", [zeros_like(b, data), where, gy], hint="grad", **attrs)
