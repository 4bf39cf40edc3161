"""VJP rule for Resize.

Resize is separable: along each resized axis y = R·x with a constant interpolation matrix
R (out × in), built here with NumPy from static shapes following the ONNX spec, so the
gradient is Rᵀ applied axis by axis (MatMuls). That is exact for any scale, integer or not.

Supported:
- mode ``nearest`` (every ``nearest_mode``), ``linear`` and ``cubic`` (``cubic_coeff_a``,
  ``exclude_outside``);
- coordinate_transformation_mode ``half_pixel``, ``half_pixel_symmetric``,
  ``pytorch_half_pixel``, ``align_corners`` and ``asymmetric``;
- scales or sizes given as constants, opset 18's ``axes`` and ``keep_aspect_ratio_policy``;
  sizes computed at run time (as PyTorch exports ``interpolate(size=...)``) when shape
  inference gives static input and output sizes on the resized axes.

Not supported (CompileError naming it): ``tf_crop_and_resize``, antialiased downscaling,
scales computed at run time, resized axes without static sizes. ``Upsample``
left the default domain at opset 10 and the gradient builder needs opset ≥ 13, so it has
no rule.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.autodiff.shape import along_axis
from service.graph.onnx_graph import attr

Grads = list[str | None]

_COORDINATES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                "asymmetric")


def _original(mode: str, scale: float, size: int, out: int) -> np.ndarray:
    """Input coordinates of the output positions 0..out-1 (ONNX Resize spec)."""
    o = np.arange(out, dtype=np.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if mode == "align_corners":
        return o * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    return o / scale  # asymmetric


def _nearest(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "round_prefer_floor":
        return np.where(x - np.floor(x) == 0.5, np.floor(x), np.floor(x + 0.5))
    if mode == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    raise CompileError(f"Resize: nearest_mode {mode!r} is not supported")


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    """Weights of the neighbours at offsets -1, 0, 1, 2 for fractional positions t."""
    def near(s: np.ndarray) -> np.ndarray:
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s: np.ndarray) -> np.ndarray:
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)


def interpolation_matrix(node: onnx.NodeProto, scale: float, size: int, out: int) -> np.ndarray:
    """R (out × in) with y = R·x along one axis."""
    mode = str(attr(node, "mode", "nearest"))
    coordinates = str(attr(node, "coordinate_transformation_mode", "half_pixel"))
    if coordinates not in _COORDINATES:
        raise CompileError(f"Resize node {node.name!r}: coordinate_transformation_mode "
                           f"{coordinates!r} is not supported")
    x = _original(coordinates, scale, size, out)
    rows = np.arange(out)
    matrix = np.zeros((out, size))
    if mode == "nearest":
        index = np.clip(_nearest(x, str(attr(node, "nearest_mode", "round_prefer_floor"))),
                        0, size - 1).astype(np.int64)
        matrix[rows, index] = 1.0
        return matrix
    base = np.floor(x)
    t = x - base
    if mode == "linear":
        offsets, weights = np.array([0, 1]), np.stack([1 - t, t], axis=1)
    elif mode == "cubic":
        offsets = np.array([-1, 0, 1, 2])
        weights = _cubic(t, float(attr(node, "cubic_coeff_a", -0.75)))  # type: ignore[arg-type]
    else:
        raise CompileError(f"Resize node {node.name!r}: mode {mode!r} is not supported")
    index = base.astype(np.int64)[:, None] + offsets[None, :]
    if int(attr(node, "exclude_outside", 0)):  # type: ignore[arg-type]
        weights = np.where((index >= 0) & (index < size), weights, 0.0)
        weights = weights / weights.sum(axis=1, keepdims=True)
    np.add.at(matrix, (np.repeat(rows, len(offsets)), np.clip(index, 0, size - 1).reshape(-1)),
              weights.reshape(-1))
    return matrix


def resize(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, y, gy = node.input[0], node.output[0], gys[0]
    assert gy is not None
    coordinates = str(attr(node, "coordinate_transformation_mode", "half_pixel"))
    if coordinates not in _COORDINATES:
        raise CompileError(f"Resize node {node.name!r}: coordinate_transformation_mode "
                           f"{coordinates!r} is not supported")
    rank = b.rank(x)
    axes = [int(a) % rank for a in attr(node, "axes", None) or range(rank)]  # type: ignore[union-attr]
    in_shape = b.shape(x) or (None,) * rank
    out_shape = b.shape(y) or (None,) * rank

    def given(position: int) -> np.ndarray | str | None:
        """A constant value, the name of a run-time tensor, or None when absent/empty."""
        if len(node.input) <= position or not node.input[position]:
            return None
        value = b.index.constant(node.input[position])
        if value is None:
            return node.input[position]
        return value.reshape(-1) if value.size else None

    scales_value, sizes_value = given(2), given(3)
    # Per resized axis: (scale, output size); None where the axis keeps its size.
    plan: dict[int, tuple[float, int | None]] = {}
    if isinstance(scales_value, np.ndarray):
        for axis, scale in zip(axes, scales_value.tolist()):
            size, out = in_shape[axis], out_shape[axis]
            if not isinstance(out, int):
                out = math.floor(size * scale) if isinstance(size, int) else None
            plan[axis] = (float(scale), out)
    elif isinstance(sizes_value, np.ndarray):
        policy = str(attr(node, "keep_aspect_ratio_policy", "stretch"))
        sizes = [in_shape[a] for a in axes]
        if any(not isinstance(s, int) for s in sizes):
            raise CompileError(f"Resize node {node.name!r}: resizing to constant sizes needs "
                               f"static input sizes, {x!r} has shape {tuple(in_shape)}")
        ratios = [int(t) / int(s) for t, s in zip(sizes_value.tolist(), sizes)]  # type: ignore[arg-type]
        if policy != "stretch":
            common = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [common] * len(axes)
        for axis, ratio, target, size in zip(axes, ratios, sizes_value.tolist(), sizes):
            out = int(target) if policy == "stretch" else round(ratio * size)  # type: ignore[operator]
            plan[axis] = (ratio, out)
    elif isinstance(sizes_value, str) and str(attr(node, "keep_aspect_ratio_policy",
                                                   "stretch")) == "stretch":
        # Sizes computed at run time (PyTorch's interpolate(size=...)): the scale is out/in,
        # read from the inferred shapes. Axes the same size on both sides, or symbolic on
        # both (the batch, whose size such graphs copy from Shape(x)), are not resized.
        for axis in axes:
            size, out = in_shape[axis], out_shape[axis]
            if size == out or (not isinstance(size, int) and not isinstance(out, int)):
                continue
            if not isinstance(size, int) or not isinstance(out, int):
                raise CompileError(
                    f"Resize node {node.name!r}: sizes computed at run time need static "
                    f"input and output sizes on axis {axis}; shapes {tuple(in_shape)} -> "
                    f"{tuple(out_shape)}"
                )
            plan[axis] = (out / size, out)
    else:
        raise CompileError(f"Resize node {node.name!r}: scales computed at run time are not "
                           "supported (constant scales, or sizes, are)")

    mode = str(attr(node, "mode", "nearest"))
    g = gy
    for axis, (scale, out) in plan.items():
        size = in_shape[axis]
        if scale == 1.0 and (out is None or out == size):
            continue  # every supported mode is the identity at scale 1
        if not isinstance(size, int) or not isinstance(out, int):
            raise CompileError(
                f"Resize node {node.name!r}: resized axis {axis} needs static sizes"
            )
        if scale < 1 and mode != "nearest" and int(attr(node, "antialias", 0)):  # type: ignore[arg-type]
            raise CompileError(f"Resize node {node.name!r}: antialiased downscaling is not "
                               "supported")
        g = along_axis(b, g, axis, rank, interpolation_matrix(node, scale, size, out), x)
    return [g] + [None] * (len(node.input) - 1)
