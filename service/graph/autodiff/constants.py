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
from service.graph.autodiff.shape import along_axis
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
    so gx = Mᵀ·gy, which also sums repeated indices. Gathers on shapes carry nothing."""
    data, indices, gy = node.input[0], node.input[1], gys[0]
    if gy is None or not needs[0] or b.index.elem_type(data) not in FLOAT_TYPES:
        return [None, None]
    value = b.index.constant(indices)
    if value is None:
        raise CompileError(f"Gather node {node.name!r}: the gradient needs constant indices")
    rank = b.rank(data)
    axis = int(attr(node, "axis", 0)) % rank  # type: ignore[arg-type]
    shape = b.shape(data)
    dim = shape[axis] if shape is not None else None
    if not isinstance(dim, int):
        raise CompileError(f"Gather node {node.name!r}: axis {axis} of {data!r} has no "
                           "static size")
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
