"""VJP rules for MaxPool and AveragePool (any spatial rank; pads, auto_pad, strides,
dilations, ceil_mode, count_include_pad).

MaxPool: the gradient goes to the arg max of each window, read from the second output
``Indices`` of a MaxPool with the same attributes (storage_order 0). The ONNX spec and
ONNX Runtime make them flat over N·C·D1·…·Dn, pads not counted; the rule takes them modulo
the plane size and scatters per (n, c) plane, so it is also right for a runtime that
numbers within a plane. Scattering with reduction="add" (opset ≥ 16) sums overlapping
windows; opsets 13–15 lack that reduction, so the output positions are split into classes
whose windows cannot overlap and each class is scattered on its own.

AveragePool: gy is divided by each window's divisor (a constant map computed here with
NumPy from static shapes, following ONNX Runtime: count_include_pad counts pad taps but
not the taps a ceil_mode window puts beyond the padded input) and spread back over the
windows by a depthwise ConvTranspose with a ones kernel, cropped or padded to x's size.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
from onnx import helper

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.autodiff.conv import explicit_pads, spatial_sizes, window_attrs
from service.graph.onnx_graph import attr

Grads = list[str | None]

_FORWARD_ATTRS = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


def _flat(b: VjpBuilder, t: str) -> str:
    """(N, C, *S) -> (N, C, prod S)."""
    return b.op("Reshape", [t, b.const(np.array([0, 0, -1], dtype=np.int64))])


def _plane_size(b: VjpBuilder, x: str) -> str:
    shape = b.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return b.const(np.array(math.prod(shape[2:]), dtype=np.int64))  # type: ignore[arg-type]
    spatial = b.op("Slice", [b.op("Shape", [x]), b.const(np.array([2], dtype=np.int64)),
                             b.const(np.array([np.iinfo(np.int64).max], dtype=np.int64))])
    return b.reduce("ReduceProd", spatial, [0], keepdims=False)


def max_pool(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, gy = node.input[0], gys[0]
    if gy is None:  # only the int64 Indices output was used
        return [None]
    rank = b.rank(x) - 2
    attrs = {name: attr(node, name) for name in _FORWARD_ATTRS if attr(node, name) is not None}
    _, indices = b.op_multi("MaxPool", [x], outputs=2, storage_order=0, **attrs)
    indices = b.op("Mod", [indices, _plane_size(b, x)])
    zero = helper.make_tensor("zero", b.index.elem_type(x) or onnx.TensorProto.FLOAT, [1], [0])
    zeros = _flat(b, b.op("ConstantOfShape", [b.shape_of(x)], value=zero))

    if b.opset >= 16:
        scattered = b.op("ScatterElements", [zeros, _flat(b, indices), _flat(b, gy)], axis=2,
                         reduction="add")
    else:
        # Windows of outputs `period` apart along every axis never share an input element,
        # so each class of outputs can be scattered without a reduction.
        kernel = [int(k) for k in attr(node, "kernel_shape")]  # type: ignore[union-attr]
        strides, dilations = window_attrs(node, rank)
        periods = [math.ceil((d * (k - 1) + 1) / s)
                   for k, s, d in zip(kernel, strides, dilations)]
        parts = []
        for offsets in itertools.product(*[range(p) for p in periods]):
            if all(p == 1 for p in periods):
                idx, upd = indices, gy
            else:
                args = [b.const(np.array(offsets, dtype=np.int64)),
                        b.const(np.full(rank, np.iinfo(np.int64).max, dtype=np.int64)),
                        b.const(np.arange(2, 2 + rank, dtype=np.int64)),
                        b.const(np.array(periods, dtype=np.int64))]
                idx, upd = b.op("Slice", [indices, *args]), b.op("Slice", [gy, *args])
            parts.append(b.op("ScatterElements", [zeros, _flat(b, idx), _flat(b, upd)], axis=2))
        scattered = parts[0] if len(parts) == 1 else b.add(parts)
    return [b.reshape_like(scattered, x)]


def _average_geometry(b: VjpBuilder, node: onnx.NodeProto, x: str
                      ) -> tuple[list[int], list[int], list[int], list[int], list[int],
                                 list[int], list[int]]:
    """Sizes, output sizes, kernel, strides, dilations and (begin, end) pads per axis."""
    sizes = spatial_sizes(b, node, x, "the gradient of AveragePool")
    rank = len(sizes)
    kernel = [int(k) for k in attr(node, "kernel_shape")]  # type: ignore[union-attr]
    strides, dilations = window_attrs(node, rank)
    begin, end = explicit_pads(b, node, x, kernel, strides, dilations)
    auto = str(attr(node, "auto_pad", "NOTSET"))
    ceil_mode = int(attr(node, "ceil_mode", 0))  # type: ignore[arg-type]
    outs = []
    for size, k, s, d, pb, pe in zip(sizes, kernel, strides, dilations, begin, end):
        span = size + pb + pe - (d * (k - 1) + 1)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
        elif ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= size + pb:  # the last window would start in the end padding
                out -= 1
        else:
            out = span // s + 1
        outs.append(out)
    inferred = b.shape(node.output[0])
    if inferred is not None:
        for axis, (mine, theirs) in enumerate(zip(outs, inferred[2:])):
            if isinstance(theirs, int) and theirs != mine:
                raise CompileError(
                    f"AveragePool node {node.name!r}: computed output size {mine} on spatial "
                    f"axis {axis}, shape inference says {theirs}"
                )
    return sizes, outs, kernel, strides, dilations, begin, end


def average_pool(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, gy = node.input[0], gys[0]
    assert gy is not None
    sizes, outs, kernel, strides, dilations, begin, end = _average_geometry(b, node, x)
    shape = b.shape(x)
    channels = shape[1] if shape is not None else None
    if not isinstance(channels, int):
        raise CompileError(f"AveragePool node {node.name!r}: the channel count of {x!r} "
                           "is not static")
    include_pad = int(attr(node, "count_include_pad", 0))  # type: ignore[arg-type]

    divisors = []
    for size, out, k, s, d, pb, pe in zip(sizes, outs, kernel, strides, dilations, begin, end):
        taps = np.arange(out)[:, None] * s - pb + d * np.arange(k)[None, :]
        inside = (taps >= -pb) & (taps < size + pe) if include_pad else (taps >= 0) & (taps < size)
        divisors.append(np.maximum(inside.sum(axis=1), 1).astype(np.float64))
    divisor = divisors[0]
    for axis_divisor in divisors[1:]:
        divisor = np.multiply.outer(divisor, axis_divisor)

    dtype = b.np_dtype(x)
    kernel_value = np.ones((channels, 1, *kernel), dtype=dtype)
    if np.all(divisor == divisor.flat[0]):
        kernel_value /= divisor.flat[0]
        scaled = gy
    else:
        scaled = b.op("Mul", [gy, b.const((1.0 / divisor).astype(dtype))])

    # ConvTranspose spans s·(out−1) + d·(k−1) + 1 positions from -pb; keep [0, size).
    crop_end, output_padding = [], []
    for size, out, k, s, d, pb in zip(sizes, outs, kernel, strides, dilations, begin):
        extra = s * (out - 1) + d * (k - 1) + 1 - pb - size
        crop_end.append(max(extra, 0))
        output_padding.append(max(-extra, 0))
    gx = b.op("ConvTranspose", [scaled, b.const(kernel_value, hint="ones")], group=channels,
              strides=strides, dilations=dilations, pads=begin + crop_end,
              output_padding=output_padding, kernel_shape=kernel, hint="grad")
    return [gx]
