"""VJP rule for Conv (1-D, 2-D and 3-D; strides, pads, auto_pad, dilations, groups).

The input gradient of a stride-1 convolution is itself a convolution of the output
gradient with the spatially flipped weights, input and output channels swapped per group,
and pads' = d·(k−1) − pads; ONNX Runtime runs that much faster than ConvTranspose. Strided
convolutions use ConvTranspose with the forward weights and an ``output_padding`` that
gives back the input's spatial size, or, where that measured faster, stride-1
convolutions per output phase (one convolution for all phases on an input ONNX Runtime
does not block) interleaved by DepthToSpace (``_phase_gradient``); either
is followed by an exact 1×1 depthwise Conv that puts the gradient back into ONNX
Runtime's blocked layout (``_into_blocked``). Weight gradients are not supported (the
weights of a deployed model are initializers, which never need one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import NCHWC_BLOCK, VjpBuilder
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
        return b.const(flipped, hint="flipped_w")  # a view: copied when the proto is made
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


def _phase_taps(size: int, out: int, k: int, s: int, pad: int
                ) -> list[tuple[np.ndarray, int, int]] | None:
    """Per output phase r of one spatial axis (input positions i = s·q + r): the kernel
    taps reaching it, last first, and the (begin, end) pads of the stride-1 convolution of
    the output gradient that yields it for q < ceil(size / s); an empty tap list where no
    tap reaches the phase, None where a pad would be negative.

    Forward, y[o] = Σ_j w[j]·x[s·o + j − pad], so x[s·q + r] meets the taps j ≡ r + pad
    (mod s), j = j0 + s·t, at o = q + c − t with c = (r + pad − j0) / s.
    """
    phases = -(-size // s)
    taps = []
    for r in range(s):
        j0 = (r + pad) % s
        reach = np.arange(j0, k, s)[::-1]
        if reach.size == 0:
            taps.append((reach, 0, 0))
            continue
        begin = reach.size - 1 - (r + pad - j0) // s
        end = phases - 1 + reach.size - out - begin
        if begin < 0 or end < 0:
            return None
        taps.append((reach, begin, end))
    return taps


def _phase_gradient(b: VjpBuilder, node: onnx.NodeProto, gy: str, w: str, sizes: list[int],
                    kernel: list[int], strides: list[int], dilations: list[int],
                    begin: list[int], end: list[int], group: int) -> str | None:
    """The input gradient of a strided 2-D convolution as stride-1 convolutions of gy, one
    per output phase, interleaved by DepthToSpace; None where this form is not the faster
    one.

    The phase sub-kernels together hold exactly the forward's taps. On an input ONNX Runtime
    blocks, each phase is its own convolution, run blocked (which ConvTranspose cannot) and
    concatenated; the interleaving runs in NCHW and costs a few passes over the gradient.
    Measured against ConvTranspose (BENCHMARKS.md, "Guided backprop in the blocked
    layout"), that pays for dense convolutions whose kernel spans more than two strides (5×5
    and 7×7 at stride 2: 0.76–1.0 of ConvTranspose's time), and not for 3×3 at stride 2
    (0.96–1.14) or depthwise ones (1.08–1.71). On an input it does not block (a stem's
    3-channel image) separate phases of 3 channels each ran slower than ConvTranspose; one
    convolution yielding every phase's channels (the sub-kernels zero-padded to one size and
    one set of pads) runs blocked on its blocked gy instead: the 7×7 stride-2 stem of
    DenseNet-121 (and of ResNets) took 0.63–0.68 of ConvTranspose's time at 224
    (BENCHMARKS.md, "Guided backprop in the blocked layout", 2026-12-02). Chosen by shape
    alone, so the graph is the same in every dtype. Also needs equal strides, constant
    weights and no dilation.
    """
    weights = b.index.constant(w)
    shape = b.shape(node.input[0])
    if (len(sizes) != 2 or weights is None or group != 1 or any(d != 1 for d in dilations)
            or strides[0] != strides[1] or any(k < 2 * s + 1 for k, s in zip(kernel, strides))
            or shape is None or not isinstance(shape[1], int)):
        return None
    separate = shape[1] % NCHWC_BLOCK == 0
    if not separate and weights.shape[0] % NCHWC_BLOCK:
        return None
    outs = [(size + pb + pe - k) // s + 1
            for size, pb, pe, k, s in zip(sizes, begin, end, kernel, strides)]
    axes = [_phase_taps(size, out, k, s, pb)
            for size, out, k, s, pb in zip(sizes, outs, kernel, strides, begin)]
    if any(axis is None or any(reach.size == 0 for reach, _, _ in axis) for axis in axes):
        return None
    swapped = weights.swapaxes(0, 1)  # (M, C, *K) -> (C, M, *K)
    phases = [-(-size // s) for size, s in zip(sizes, strides)]
    if separate:
        parts = []
        for (th, bh, eh) in axes[0]:  # type: ignore[union-attr]
            for (tw, bw, ew) in axes[1]:  # type: ignore[union-attr]
                sub = np.ascontiguousarray(swapped[:, :, th][:, :, :, tw])
                parts.append(b.op("Conv", [gy, b.const(sub, hint="phase_w")],
                                  pads=[bh, bw, eh, ew], kernel_shape=list(sub.shape[2:]),
                                  hint="grad_phase"))
        every = b.op("Concat", parts, axis=1)
    else:
        # Per axis, each phase's taps shifted right by (first pad - its own begin pad)
        # within one length: a stride-1 convolution with a leading zero tap and one more
        # pad gives the same outputs, and the trailing pad then agrees for every phase.
        first = [max(bg for _, bg, _ in axis) for axis in axes]  # type: ignore[union-attr]
        length = [max(reach.size + f - bg for reach, bg, _ in axis)  # type: ignore[union-attr]
                  for axis, f in zip(axes, first)]
        trailing = [p - o + n - 1 - f for p, o, n, f in zip(phases, outs, length, first)]
        if min(trailing) < 0:
            return None
        c = swapped.shape[0]
        merged = np.zeros((len(axes[0]) * len(axes[1]) * c, swapped.shape[1], *length),  # type: ignore[arg-type]
                          dtype=weights.dtype)
        phase = 0
        for (th, bh, _) in axes[0]:  # type: ignore[union-attr]
            for (tw, bw, _) in axes[1]:  # type: ignore[union-attr]
                oh, ow = first[0] - bh, first[1] - bw
                merged[phase * c:(phase + 1) * c, :, oh:oh + th.size, ow:ow + tw.size] = (
                    swapped[:, :, th][:, :, :, tw])
                phase += 1
        every = b.op("Conv", [gy, b.const(merged, hint="phase_w")],
                     pads=[*first, *trailing], kernel_shape=length, hint="grad_phase")
    # DCR: channel (r_h·s + r_w)·C + c holds phase (r_h, r_w) of channel c, as built above.
    gx = b.op("DepthToSpace", [every], blocksize=strides[0], mode="DCR")
    if any(p * s != size for p, s, size in zip(phases, strides, sizes)):
        gx = b.op("Slice", [gx, b.const(_i64([0, 0])), b.const(_i64(sizes)),
                            b.const(_i64([2, 3]))])
    return gx


def _transposed_gradient(b: VjpBuilder, gy: str, w: str, sizes: list[int], kernel: list[int],
                         strides: list[int], dilations: list[int], begin: list[int],
                         end: list[int], group: int) -> str:
    """The input gradient of any convolution as one ConvTranspose by the forward weights."""
    # ConvTranspose yields s·(out−1) + d·(k−1) + 1 − pads + output_padding; the forward's
    # floor division dropped exactly this remainder of the input.
    output_padding = [
        (size + pb + pe - d * (k - 1) - 1) % s
        for size, pb, pe, k, s, d in zip(sizes, begin, end, kernel, strides, dilations)
    ]
    return b.op("ConvTranspose", [gy, w], strides=strides, dilations=dilations, group=group,
                pads=begin + end, output_padding=output_padding, kernel_shape=kernel,
                hint="grad")


def _into_blocked(b: VjpBuilder, gx: str, x: str) -> str:
    """gx through a 1×1 depthwise Conv by ones (exact) where x can be blocked.

    Neither strided form ends in an op with a blocked kernel in ONNX Runtime, and ONNX
    Runtime reorders a tensor back into its blocked layout only in front of a Conv or a
    pool: without this, every elementwise op that met the gradient next ran in NCHW,
    reordered (on ResNet-50 the whole identity path of the stage below each stride-2
    block).
    """
    channels = b.blocked_channels(x)
    if channels is None:
        return gx
    return b.scale_channels(gx, np.ones(channels), x)


def _i64(values: Sequence[int]) -> np.ndarray:
    return np.array(list(values), dtype=np.int64)


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
            gx = (_phase_gradient(b, node, gy, w, sizes, kernel, strides, dilations, begin,
                                  end, group)
                  or _transposed_gradient(b, gy, w, sizes, kernel, strides, dilations,
                                          begin, end, group))
            gx = _into_blocked(b, gx, x)
    gb = None
    if len(node.input) > 2 and node.input[2] and needs[2]:
        gb = b.reduce("ReduceSum", gy, [0, *range(2, 2 + rank)], keepdims=False)
    return [gx, None, gb][: len(node.input)]
