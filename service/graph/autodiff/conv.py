"""VJP rule for Conv (1-D, 2-D and 3-D; strides, pads, auto_pad, dilations, groups).

The input gradient of a stride-1 convolution is itself a convolution of the output
gradient with the spatially flipped weights, input and output channels swapped per group,
and pads' = d·(k−1) − pads; ONNX Runtime runs that much faster than ConvTranspose. Strided
convolutions use ConvTranspose with the forward weights and an ``output_padding`` that
gives back the input's spatial size. Weight gradients are not supported (the weights of a
deployed model are initializers, which never need one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]

INT64_MIN = np.iinfo(np.int64).min


def spatial_sizes(b: VjpBuilder, node: onnx.NodeProto, x: str, why: str) -> list[int]:
    """The static spatial sizes of NC... tensor ``x``, or a CompileError saying ``why``."""
    shape = b.shape(x)
    if shape is None or any(not isinstance(d, int) for d in shape[2:]):
        raise CompileError(
            f"{node.op_type} node {node.name!r}: {why} needs static spatial sizes of its "
            f"input {x!r}, which has shape {shape}"
        )
    return [int(d) for d in shape[2:]]  # type: ignore[arg-type]


def window_attrs(node: onnx.NodeProto, rank: int) -> tuple[list[int], list[int]]:
    """The strides and dilations of a windowed op (ones by default)."""
    strides = list(attr(node, "strides", None) or [1] * rank)  # type: ignore[call-overload]
    dilations = list(attr(node, "dilations", None) or [1] * rank)  # type: ignore[call-overload]
    return [int(s) for s in strides], [int(d) for d in dilations]


def explicit_pads(b: VjpBuilder, node: onnx.NodeProto, x: str, kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads per spatial axis, resolving ``auto_pad`` from static shapes."""
    rank = len(kernel)
    auto = str(attr(node, "auto_pad", "NOTSET"))
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in attr(node, "pads", None) or [0] * (2 * rank)]  # type: ignore[union-attr]
        return pads[:rank], pads[rank:]
    if auto == "VALID":
        return [0] * rank, [0] * rank
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise CompileError(f"{node.op_type} node {node.name!r}: unknown auto_pad {auto!r}")
    sizes = spatial_sizes(b, node, x, f"auto_pad={auto}")
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin, end


def flipped_weights(b: VjpBuilder, node: onnx.NodeProto, w: str, group: int) -> str:
    """(M, C/g, *K) weights -> (C, M/g, *K): channels swapped per group, kernel flipped."""
    value = b.index.constant(w)
    if value is not None:
        m, cg, *kernel = value.shape
        swapped = value.reshape(group, m // group, cg, *kernel).swapaxes(1, 2)
        flipped = swapped.reshape(group * cg, m // group, *kernel)
        flipped = flipped[(slice(None), slice(None), *[slice(None, None, -1)] * len(kernel))]
        return b.const(np.ascontiguousarray(flipped), hint="flipped_w")
    shape = b.static_shape(w)
    if shape is None:
        raise CompileError(f"Conv node {node.name!r}: the shape of its weights {w!r} is unknown")
    m, cg, *kernel = shape
    grouped = b.op("Reshape", [w, b.const(np.array([group, m // group, cg, *kernel],
                                                    dtype=np.int64))])
    perm = [0, 2, 1, *range(3, 3 + len(kernel))]
    swapped = b.op("Reshape", [b.op("Transpose", [grouped], perm=perm),
                               b.const(np.array([group * cg, m // group, *kernel],
                                                dtype=np.int64))])
    spatial = len(kernel)
    return b.op("Slice", [swapped, b.const(np.full(spatial, -1, dtype=np.int64)),
                          b.const(np.full(spatial, INT64_MIN, dtype=np.int64)),
                          b.const(np.arange(2, 2 + spatial, dtype=np.int64)),
                          b.const(np.full(spatial, -1, dtype=np.int64))], hint="flipped_w")


def conv(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, w, gy = node.input[0], node.input[1], gys[0]
    assert gy is not None
    if needs[1]:
        raise CompileError(
            f"Conv node {node.name!r}: gradients of the weights {w!r} are not supported"
        )
    rank = b.rank(x) - 2
    w_shape = b.shape(w)
    kernel = attr(node, "kernel_shape", None)
    if kernel is None:
        if w_shape is None or any(not isinstance(k, int) for k in w_shape[2:]):
            raise CompileError(f"Conv node {node.name!r}: the kernel shape is unknown")
        kernel = w_shape[2:]
    kernel = [int(k) for k in kernel]  # type: ignore[union-attr, arg-type]
    strides, dilations = window_attrs(node, rank)
    group = int(attr(node, "group", 1))  # type: ignore[arg-type]
    begin, end = explicit_pads(b, node, x, kernel, strides, dilations)

    gx = None
    if needs[0]:
        reach = [d * (k - 1) for k, d in zip(kernel, dilations)]
        mirrored = [r - p for r, p in zip(reach, begin)] + [r - p for r, p in zip(reach, end)]
        if all(s == 1 for s in strides) and min(mirrored) >= 0:
            gx = b.op("Conv", [gy, flipped_weights(b, node, w, group)], pads=mirrored,
                      dilations=dilations, group=group, kernel_shape=kernel, hint="grad")
        else:
            sizes = spatial_sizes(b, node, x, "the gradient of a strided convolution")
            # ConvTranspose yields s·(out−1) + d·(k−1) + 1 − pads + output_padding; the
            # forward's floor division dropped exactly this remainder of the input.
            output_padding = [
                (size + pb + pe - d * (k - 1) - 1) % s
                for size, pb, pe, k, s, d in zip(sizes, begin, end, kernel, strides, dilations)
            ]
            gx = b.op("ConvTranspose", [gy, w], strides=strides, dilations=dilations,
                      group=group, pads=begin + end, output_padding=output_padding,
                      kernel_shape=kernel, hint="grad")
    gb = None
    if len(node.input) > 2 and node.input[2] and needs[2]:
        gb = b.reduce("ReduceSum", gy, [0, *range(2, 2 + rank)], keepdims=False)
    return [gx, None, gb][: len(node.input)]
