"""CNN Fixations: back-track the explained logit to the image pixels that drove it.

The walk starts from the class's logit and goes through the network in reverse
topological order (:class:`service.graph.fixations.FixationPlan`), mapping the set of
"fixated" neurons of each tensor onto its inputs, as in the authors' code
(val-iisc/cnn-fixations, ``demo/layers.py``; the rules are collected in
``shared/research/fixations.md``):

- FC on a vector: every input j with a_j·w_ij > 0. FC on a flattened C×H×W map: only the
  argmax of a_j·w_ij.
- Conv: the input channel with the largest contribution Σ_window a·w summed over the
  receptive field (padding, stride, dilation and groups honoured; padded taps add 0).
- Max/Average pooling: the argmax of the activation in the window; GlobalAveragePool and
  ReduceMean over H, W: the argmax over the map. Out-of-range taps are never chosen.
- Add: the larger summand (ties: the first input). Concat: the branch owning the channel.
  SE-style Mul: the full-resolution operand. Pad, Resize, Flatten, Reshape, Transpose,
  Slice and every output of Split: index mapping (a Slice or Split output element has
  exactly one source: first + index · step per axis). BN and activations: unchanged.

**Position rule of the Conv step: argmax contribution.** Within the chosen channel the
new position is the in-range tap with the largest a·w, as in the PyTorch port
(StianHanssen/CNN-Fixations-PyTorch); when no tap contributes positively (a dead window)
it is the centre tap, clipped into the in-range taps. Why this one:

- It applies the paper's criterion, "follow what contributes most to the traced neuron",
  to the position as well as to the channel, with the same numbers.
- The centre tap (the authors' ``conv()``) makes every stride-1 conv a no-op for
  positions, so in networks without pooling before the head (most modern ones, and the
  DenseNet/ResNet stems downsample by strided convs) the image points snap to a lattice
  of the total stride, and only pooling and FC argmaxes localise.
- The activation argmax (the authors' ``res()``) ignores the weight's sign: a strongly
  activated tap the kernel suppresses can be chosen.
- The centre fallback keeps dead windows from drifting to their top-left corner (what
  ``np.argmax`` of all-equal values would give).

The FC rule on a vector is the one rule a caller may replace (``walk(..., fc=...)``): it
then gets a weight per point as well (``service.methods.fixations_summed``, the
class-discriminative variant); the authors' walk carries no weights.

Every rule works on all points of a tensor at once: points are int64 rows
``[tag, *index]`` (``tag`` = position of the class in the request, ``index`` = the full
index into the tensor, batch axis included), windows are gathered by fancy indexing, FC
rows are processed in chunks, and the points of each tensor are sorted and deduplicated
(as ``np.unique(axis=0)`` would) once all its consumers have contributed. Contributions
are float64 (the products of float32 values are exact), so ties break the same way in any
summation order.

Mopuri, Garg, Babu, "CNN Fixations: An unraveling approach to visualize the discriminative
image regions", IEEE TIP 2019, https://arxiv.org/abs/1708.06670
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import cv2
import numpy as np

from service.graph.build import Capability
from service.graph.fixations import FixationPlan, Step
from service.methods.base import Captures, Method, RawMap, Row
from service.models.spec import Layout

# Elements per gathered block: bounds the walk's temporary memory (16 MiB of float64).
CHUNK = 1 << 21
# The authors' heatmap: σ = 20 px on ImageNet-sized images; we scale it from 224 px.
SIGMA_PX = 20.0
SIGMA_REFERENCE = 224
# Outlier removal: neighbours within 10 % of the image diagonal, kept above 5 % of points.
RADIUS_FRACTION = 0.1
MIN_NEIGHBOUR_FRACTION = 0.05

Points = np.ndarray
Weights = np.ndarray  # float64, one per point
Rule = Callable[[Step, Points, Mapping[str, np.ndarray]], list[tuple[str, Points]]]
# An FC rule that reads and gives weights: (step, points, their weights, activations) →
# [(input tensor, points, their weights or None)].
FcRule = Callable[[Step, Points, Weights, Mapping[str, np.ndarray]],
                  list[tuple[str, Points, Weights | None]]]


def walk(plan: FixationPlan, activations: Mapping[str, np.ndarray], classes: Sequence[int],
         *, fc: FcRule | None = None, trace: bool = False) -> dict[str, Points]:
    """Back-track ``classes``' logits to the image.

    Args:
        plan: the compiled path.
        activations: the values of ``plan.needed`` for one image (batch of one).
        classes: logit indices; the points of ``classes[k]`` carry tag k.
        fc: the rule for FC layers on a vector (not a flattened map), given each point's
            weight; None for the authors' rule (every positive contribution, unweighted).
            Start points weigh 1; weights ride unchanged through the steps that move each
            point to exactly one point (activations, reshapes, transposes, slices, a
            broadcast of one operand), are summed where points merge, and are dropped
            (reset to 1) by every other rule.
        trace: keep the points of every tensor, not only the image's.

    Returns:
        Sorted unique points, int64 rows ``[tag, *index]``, keyed by tensor name: the
        image's always (possibly empty), every reached tensor's with ``trace``.
    """
    start = np.zeros((len(classes), 1 + len(plan.logits_shape)), dtype=np.int64)
    start[:, 0] = np.arange(len(classes))
    if len(classes):
        start[:, 2:] = np.stack(np.unravel_index(np.asarray(classes, dtype=np.int64),
                                                 plan.logits_shape[1:]), axis=1)
    weighted = fc is not None
    pending: dict[str, list[tuple[Points, Weights | None]]] = defaultdict(list)
    pending[plan.logits].append((start, None))
    seen: dict[str, Points] = {}
    for step in plan.steps:
        parts = pending.pop(step.output, None)
        if not parts:
            continue
        if step.rule == "pass" and not trace:
            # Every rule maps each point on its own, so duplicates only cost time: leave
            # merging them to the next step that moves points (half the steps of a
            # BN → ReLU → Conv network are these).
            pending[step.inputs[0]].extend(parts)
            continue
        points, weights = _unique(parts, len(classes), step.output_shape, weighted)
        if trace:
            seen[step.output] = points
        if fc is not None and step.rule == "fc" and not step.attrs["spatial"]:
            assert weights is not None
            moved = fc(step, points, weights, activations)
        else:
            carry = weights if weighted and _one_to_one(step) else None
            moved = [(name, mapped, carry)
                     for name, mapped in RULES[step.rule](step, points, activations)]
        for name, mapped, w in moved:
            if len(mapped):
                pending[name].append((mapped, w))
    image = pending.get(plan.image)
    seen[plan.image] = (_unique(image, len(classes), plan.image_shape, False)[0] if image else
                        np.zeros((0, 1 + len(plan.image_shape)), dtype=np.int64))
    return seen


def _one_to_one(step: Step) -> bool:
    """Whether ``step``'s rule maps every point to exactly one point of its one input, in
    order (so a weight per point stays aligned)."""
    return step.rule in ("pass", "reshape", "transpose", "slice", "gather") or (
        step.rule in ("broadcast", "mul") and len(step.inputs) == 1)


def _unique(parts: list[tuple[Points, Weights | None]], tags: int, shape: Sequence[int],
            weighted: bool) -> tuple[Points, Weights | None]:
    """Sorted unique rows, as ``np.unique(axis=0)`` gives; with ``weighted``, each row's
    weight summed over its duplicates (1 where none was given).

    Rows are ordered by one int64 key each (their row-major offset in the tag × tensor
    grid) and the first row of each key is kept: a stable argsort and a mask, not
    ``np.unique`` and ``np.unravel_index``, which took 2.5× as long on the few hundred
    points a step has (the walk calls this at every step that moves points). The stable
    sort keeps duplicates in their given order, so their weights add up in that order.
    """
    arrays = [p for p, _ in parts]
    points = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    offsets = points @ _strides(tags, tuple(shape))
    order = np.argsort(offsets, kind="stable")
    keys = offsets[order]
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    unique = points[order[first]]
    if not weighted:
        return unique, None
    given = np.concatenate([np.ones(len(p)) if w is None else w for p, w in parts])
    weights = np.bincount(np.cumsum(first) - 1, weights=given[order], minlength=len(unique))
    return unique, weights


@lru_cache(maxsize=1024)
def _strides(tags: int, shape: tuple[int, ...]) -> np.ndarray:
    """Row-major strides of the (tags, *shape) grid: a point's offset is ``point @ strides``."""
    dims = (tags, *shape)
    return np.array([math.prod(dims[d + 1:]) for d in range(len(dims))], dtype=np.int64)


def _with(points: Points, index: np.ndarray) -> Points:
    """Rows [tag, *index] from ``points``' tags and a new (N, rank) index."""
    return np.concatenate([points[:, :1], index], axis=1)


def _broadcast_index(points: Points, shape: Sequence[int]) -> np.ndarray:
    """The index into an operand of ``shape`` that numpy broadcasting reads for each point."""
    index = points[:, points.shape[1] - len(shape):].copy()
    index[:, [d for d, size in enumerate(shape) if size == 1]] = 0
    return index


def _pass(step: Step, points: Points, acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    return [(step.inputs[0], points)]


def _broadcast(step: Step, points: Points,
               acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    return [(name, _with(points, _broadcast_index(points, shape)))
            for name, shape in zip(step.inputs, step.input_shapes)]


def _add(step: Step, points: Points, acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    indices = [_broadcast_index(points, shape) for shape in step.input_shapes]
    values = np.stack([acts[name][tuple(index.T)] for name, index in zip(step.inputs, indices)],
                      axis=1)
    choice = values.argmax(axis=1)  # ties: the first summand
    return [(name, _with(points[choice == k], index[choice == k]))
            for k, (name, index) in enumerate(zip(step.inputs, indices))]


def _concat(step: Step, points: Points,
            acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    column = 1 + step.attrs["axis"]
    out = []
    for name, shape, offset in zip(step.inputs, step.input_shapes, step.attrs["offsets"]):
        position = points[:, column]
        mine = points[(position >= offset) & (position < offset + shape[step.attrs["axis"]])]
        mine = mine.copy()
        mine[:, column] -= offset
        out.append((name, mine))
    return out


def _reshape(step: Step, points: Points,
             acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    flat = np.ravel_multi_index(tuple(points[:, 1:].T), step.output_shape)
    index = np.stack(np.unravel_index(flat, step.input_shapes[0]), axis=1)
    return [(step.inputs[0], _with(points, index))]


def _transpose(step: Step, points: Points,
               acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    index = np.empty_like(points[:, 1:])
    index[:, step.attrs["perm"]] = points[:, 1:]
    return [(step.inputs[0], _with(points, index))]


def _slice(step: Step, points: Points,
           acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    """Slice, or one Split output: input index = first + output index · step, per axis."""
    index = points[:, 1:] * np.asarray(step.attrs["steps"]) + np.asarray(step.attrs["starts"])
    return [(step.inputs[0], _with(points, index))]


def _gather(step: Step, points: Points,
            acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    """Gather with constant indices: the r output axes at ``axis`` become the one input
    index they name there; the axes before and after stay."""
    axis, indices = step.attrs["axis"], step.attrs["indices"]
    out = points[:, 1:]
    r = indices.ndim
    picked = indices[tuple(out[:, axis + j] for j in range(r))] if r else np.full(
        len(out), int(indices), dtype=np.int64)
    index = np.concatenate([out[:, :axis], picked[:, None], out[:, axis + r:]], axis=1)
    return [(step.inputs[0], _with(points, index))]


def _pad(step: Step, points: Points, acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    shape = np.asarray(step.input_shapes[0])
    index = points[:, 1:] - np.asarray(step.attrs["begin"])
    mode = step.attrs["mode"]
    if mode == "constant":  # points on the padding have no source
        inside = np.all((index >= 0) & (index < shape), axis=1)
        return [(step.inputs[0], _with(points[inside], index[inside]))]
    if mode == "reflect":
        index = np.abs(index)
        index = np.where(index >= shape, 2 * (shape - 1) - index, index)
    return [(step.inputs[0], _with(points, np.clip(index, 0, shape - 1)))]


def _resize_source(out: np.ndarray, n_in: int, n_out: int, scale: float,
                   attrs: Mapping[str, object]) -> np.ndarray:
    o = out.astype(np.float64)
    mode = attrs["coordinate_mode"]
    if mode in ("pytorch_half_pixel", "align_corners") and n_out == 1:
        x = np.zeros_like(o)
    elif mode in ("half_pixel", "pytorch_half_pixel"):
        x = (o + 0.5) / scale - 0.5
    elif mode == "align_corners":
        x = o * (n_in - 1) / (n_out - 1)
    elif mode == "asymmetric":
        x = o / scale
    else:  # tf_half_pixel_for_nn
        x = (o + 0.5) / scale
    rounding = attrs["nearest_mode"] if attrs["mode"] == "nearest" else "round_prefer_ceil"
    if rounding == "floor":
        source = np.floor(x)
    elif rounding == "ceil":
        source = np.ceil(x)
    elif rounding == "round_prefer_ceil":
        source = np.floor(x + 0.5)
    else:  # round_prefer_floor
        source = np.ceil(x - 0.5)
    return np.clip(source, 0, n_in - 1).astype(np.int64)


def _resize(step: Step, points: Points,
            acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    index = points[:, 1:].copy()
    for d, (n_in, n_out, scale) in enumerate(zip(step.input_shapes[0], step.output_shape,
                                                 step.attrs["scales"])):
        if n_in != n_out:
            index[:, d] = _resize_source(index[:, d], n_in, n_out, scale, step.attrs)
    return [(step.inputs[0], _with(points, index))]


def _taps(origin_at: np.ndarray, stride: int, pad: int, kernel: int, dilation: int,
          size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) input coordinates of a window's taps, and whether each is in range."""
    taps = (origin_at * stride - pad)[:, None] + np.arange(kernel) * dilation
    return taps, (taps >= 0) & (taps < size)


def _pool(step: Step, points: Points,
          acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    x = acts[step.inputs[0]]
    a = step.attrs
    (kh, kw), (sy, sx), (dy, dx), (py, px) = a["kernel"], a["strides"], a["dilations"], a["pads"]
    out = []
    per = max(1, CHUNK // (kh * kw))
    for lo in range(0, len(points), per):
        p = points[lo:lo + per]
        b, c = p[:, 1], p[:, 2]
        ys, vy = _taps(p[:, 3], sy, py, kh, dy, x.shape[2])
        xs, vx = _taps(p[:, 4], sx, px, kw, dx, x.shape[3])
        pixel = (np.clip(ys, 0, x.shape[2] - 1) * x.shape[3])[:, :, None] + np.clip(
            xs, 0, x.shape[3] - 1)[:, None, :]
        plane = (b * x.shape[1] + c) * (x.shape[2] * x.shape[3])
        values = x.reshape(-1).take(plane[:, None, None] + pixel)
        valid = vy[:, :, None] & vx[:, None, :]
        best = np.where(valid, values, -np.inf).reshape(len(p), -1).argmax(axis=1)
        rows = np.arange(len(p))
        ky, kx = np.divmod(best, kw)
        keep = vy.any(axis=1) & vx.any(axis=1)
        index = np.stack([b, c, ys[rows, ky], xs[rows, kx]], axis=1)
        out.append(_with(p, index)[keep])
    return [(step.inputs[0], np.concatenate(out))]


def _centre(kernel: int, valid: np.ndarray) -> np.ndarray:
    """The centre tap, clipped into the (contiguous) in-range taps of each window."""
    first = valid.argmax(axis=1)
    last = kernel - 1 - valid[:, ::-1].argmax(axis=1)
    return np.clip((kernel - 1) // 2, first, last)


def _conv(step: Step, points: Points, acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    x = acts[step.inputs[0]]
    w = step.weight
    assert w is not None
    a = step.attrs
    (sy, sx), (dy, dx), (py, px) = a["strides"], a["dilations"], a["pads"]
    m_total, cg, kh, kw = w.shape
    per_group = m_total // a["group"]
    height, width = x.shape[2], x.shape[3]
    if kh == kw == 1 and py == px == 0:
        return [(step.inputs[0], _conv_1x1(step, points, x))]
    out = []
    per = max(1, CHUNK // (cg * kh * kw))
    whole = x.shape[0] == 1 and a["group"] == 1
    for lo in range(0, len(points), per):
        p = points[lo:lo + per]
        n, rows = len(p), np.arange(len(p))
        b, m = p[:, 1], p[:, 2]
        ys, vy = _taps(p[:, 3], sy, py, kh, dy, height)
        xs, vx = _taps(p[:, 4], sx, px, kw, dx, width)
        valid = vy[:, :, None] & vx[:, None, :]  # (n, kh, kw)
        first = (m // per_group) * cg  # the group's first input channel
        pixel = (np.clip(ys, 0, height - 1) * width)[:, :, None] + np.clip(xs, 0, width - 1)[
            :, None, :]  # (n, kh, kw)
        if whole:
            # One image, every point reading every channel: gather the taps' columns of
            # the (C, H·W) map, an index per tap rather than per tap and channel.
            window = x.reshape(cg, -1).take(pixel.reshape(-1), axis=1).reshape(
                cg, n, kh, kw).transpose(1, 0, 2, 3).astype(np.float64)
        else:
            pixel += ((b * x.shape[1] + first) * (height * width))[:, None, None]
            flat = (np.arange(cg) * (height * width))[None, :, None, None] + pixel[:, None]
            window = x.reshape(-1).take(flat).astype(np.float64)
        if not valid.all():
            window *= valid[:, None]  # zero padding
        # In float64 before einsum, which casts a float32 operand more slowly itself.
        kernels = w[m].astype(np.float64)
        channel = np.einsum("nckl,nckl->nc", window, kernels).argmax(axis=1)
        contribution = window[rows, channel] * kernels[rows, channel]
        contribution[~valid] = -np.inf
        taps = contribution.reshape(n, -1)
        best = taps.argmax(axis=1)
        ky, kx = np.divmod(best, kw)
        dead = ~(taps[rows, best] > 0)
        if dead.any():
            ky = np.where(dead, _centre(kh, vy), ky)
            kx = np.where(dead, _centre(kw, vx), kx)
        index = p.copy()  # [tag, b] stay
        index[:, 2], index[:, 3], index[:, 4] = first + channel, ys[rows, ky], xs[rows, kx]
        keep = vy.any(axis=1) & vx.any(axis=1)
        out.append(index if keep.all() else index[keep])
    return [(step.inputs[0], out[0] if len(out) == 1 else np.concatenate(out))]


def _conv_1x1(step: Step, points: Points, x: np.ndarray) -> Points:
    """The conv rule for an unpadded 1×1 kernel: its one tap, at (stride · o), is the
    position; only the channel is chosen, as the general rule would (the same float64
    products, so the same argmax)."""
    w = step.weight
    assert w is not None
    (sy, sx), group = step.attrs["strides"], step.attrs["group"]
    m_total, cg = w.shape[:2]
    out = []
    per = max(1, CHUNK // x.shape[1])
    for lo in range(0, len(points), per):
        p = points[lo:lo + per]
        b, m, y, xx = p[:, 1], p[:, 2], p[:, 3] * sy, p[:, 4] * sx
        first = (m // (m_total // group)) * cg
        window = x[b, :, y, xx]  # (n, C): every channel of each point's one tap
        if group > 1:
            window = np.take_along_axis(window, first[:, None] + np.arange(cg), axis=1)
        channel = (window.astype(np.float64) * w[m, :, 0, 0]).argmax(axis=1)
        out.append(_with(p, np.stack([b, first + channel, y, xx], axis=1)))
    return np.concatenate(out)


def _reduce(step: Step, points: Points,
            acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    x = acts[step.inputs[0]]
    axes = list(step.attrs["axes"])
    kept = [d for d in range(x.ndim) if d not in axes]
    kept_index = points[:, 1:][:, kept] if step.attrs["keepdims"] else points[:, 1:]
    kept_dims = tuple(x.shape[d] for d in kept)
    reduced_dims = tuple(x.shape[d] for d in axes)
    table = np.transpose(x, kept + axes).reshape(int(np.prod(kept_dims)), -1)
    row = np.ravel_multi_index(tuple(kept_index.T), kept_dims) if kept else np.zeros(
        len(points), dtype=np.int64)
    per = max(1, CHUNK // table.shape[1])
    column = np.concatenate([table[row[lo:lo + per]].argmax(axis=1)
                             for lo in range(0, len(points), per)])
    index = np.empty((len(points), x.ndim), dtype=np.int64)
    index[:, kept] = kept_index
    index[:, axes] = np.stack(np.unravel_index(column, reduced_dims), axis=1)
    return [(step.inputs[0], _with(points, index))]


def _fc(step: Step, points: Points, acts: Mapping[str, np.ndarray]) -> list[tuple[str, Points]]:
    x = acts[step.inputs[0]]
    w = step.weight
    assert w is not None
    table = x.reshape(-1, x.shape[-1])
    rows = np.ravel_multi_index(tuple(points[:, 1:-1].T), x.shape[:-1])
    neurons = points[:, -1]
    spatial = step.attrs["spatial"]
    per = max(1, CHUNK // x.shape[-1])
    out = []
    for row in np.unique(rows):
        mine = np.flatnonzero(rows == row)
        inputs = table[row].astype(np.float64)
        for lo in range(0, len(mine), per):
            sel = mine[lo:lo + per]
            contribution = w[neurons[sel]] * inputs  # (n, in): exact float64 products
            if spatial:  # a flattened map: only the strongest contribution
                which, j = np.arange(len(sel)), contribution.argmax(axis=1)
            else:  # a vector: every positive contribution
                which, j = np.nonzero(contribution > 0)
            src = points[sel[which]]
            out.append(np.concatenate([src[:, :-1], j[:, None]], axis=1))
    return [(step.inputs[0], np.concatenate(out))]


RULES: dict[str, Rule] = {
    "pass": _pass, "broadcast": _broadcast, "add": _add, "mul": _broadcast,
    "concat": _concat, "reshape": _reshape, "transpose": _transpose, "pad": _pad,
    "resize": _resize, "slice": _slice, "gather": _gather, "pool": _pool, "conv": _conv,
    "reduce": _reduce, "fc": _fc,
}


def image_points(plan: FixationPlan, points: Points, tag: int) -> np.ndarray:
    """(N, 2) int64 (x, y) on the model's input grid for the points tagged ``tag``; one row
    per image point, so a pixel fixated in several channels appears several times."""
    mine = points[points[:, 0] == tag]
    if plan.image_layout is Layout.NHWC:  # [tag, b, y, x, c]
        return mine[:, [3, 2]]
    return mine[:, [4, 3]]  # [tag, b, c, y, x]


def inliers(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Which points have more than 5 % of all points (themselves included) closer than
    0.1 × the image diagonal (the authors' ``out_rem``)."""
    n = len(xy)
    radius2 = (RADIUS_FRACTION * np.hypot(height, width)) ** 2
    pts = xy.astype(np.float64)
    per = max(1, CHUNK // max(n, 1))
    counts = np.concatenate([
        np.count_nonzero(((pts[lo:lo + per, None, :] - pts[None]) ** 2).sum(axis=2) < radius2,
                         axis=1)
        for lo in range(0, n, per)
    ]) if n else np.zeros(0, dtype=np.int64)
    return counts > MIN_NEIGHBOUR_FRACTION * n


def density(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Point counts blurred by a Gaussian (the authors' ``heatmap``), scaled to max 1.

    σ = 20 px at 224 px, scaled to the grid's shorter side; the kernel spans that side
    (rounded down to odd); cv2's default border (REFLECT_101).

    The blur is separable and linear, and the counts are a few hundred points on a grid of
    tens of thousands of pixels, so it is evaluated as Ky[:, ys]·diag(counts)·Kx[:, xs]ᵀ
    with the two 1-D blur operators as matrices: the same values as convolving the count
    image (a 255-tap kernel over a 256² grid, ~10 ms), in well under a millisecond.
    """
    short = min(height, width)
    k = short if short % 2 == 1 else short - 1
    sigma = SIGMA_PX * short / SIGMA_REFERENCE
    if len(xy) == 0:
        return np.zeros((height, width), dtype=np.float32)
    pixels, counts = np.unique(xy[:, 1] * width + xy[:, 0], return_counts=True)
    ys, xs = np.divmod(pixels, width)
    rows = _blur_operator(height, k, sigma)[:, ys] * counts
    blurred = rows @ _blur_operator(width, k, sigma)[:, xs].T
    peak = float(blurred.max())
    return (blurred / peak if peak > 0 else blurred).astype(np.float32)


@lru_cache(maxsize=16)
def _blur_operator(n: int, k: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of cv2's 1-D Gaussian blur (k taps, σ) with REFLECT_101 borders: row i
    holds the weight of every source pixel in output pixel i. Needs k // 2 < n."""
    taps = cv2.getGaussianKernel(k, sigma, cv2.CV_64F)[:, 0]
    source = np.abs(np.arange(n)[:, None] + np.arange(k)[None, :] - k // 2)  # … 2 1 | 0 1 …
    source = np.where(source > n - 1, 2 * (n - 1) - source, source)  # … n-2 n-1 | n-2 …
    operator = np.zeros((n, n))
    np.add.at(operator, (np.repeat(np.arange(n), k), source.ravel()), np.tile(taps, n))
    operator.flags.writeable = False
    return operator


class CnnFixations(Method):
    """CNN Fixations: the image points the explained logit traces back to, and their
    Gaussian density (see the module docstring for the rules), with the authors' FC rule.

    That rule is weak through GAP → FC → ReLU → FC heads: the union of every positive
    contribution to every traced hidden neuron keeps nearly every channel for every class,
    so the points hardly depend on the class (``fixations_summed`` is the measured fix).

    Mopuri, Garg, Babu, IEEE TIP 2019, https://arxiv.org/abs/1708.06670
    """

    name = "fixations"
    paper = "https://arxiv.org/abs/1708.06670"
    grid = "model"
    requires = frozenset({Capability.FIXATIONS})

    def trace(self, plan: FixationPlan, activations: Mapping[str, np.ndarray],
              classes: Sequence[int]) -> Points:
        """The image points of ``classes`` (tag k for ``classes[k]``): the authors' walk."""
        return walk(plan, activations, classes)[plan.image]

    def compute(self, captures: Captures, rows: Sequence[Row]) -> list[RawMap]:
        # The walk starts at the logit whatever the rows' target says: it follows signs of
        # contributions, which a monotone sigmoid/softmax does not change. One walk per
        # image, all its rows' classes at once (one tag each).
        maps: dict[Row, RawMap] = {}
        for image in dict.fromkeys(r.image for r in rows):
            mine = [r for r in rows if r.image == image]
            classes = [r.cls for r in mine if r.cls is not None]  # per class: never None
            maps.update(zip(mine, self._walk(captures, image, classes), strict=True))
        return [maps[r] for r in rows]

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        return [m.values for m in self.compute(captures, rows)]

    def _walk(self, captures: Captures, image: int, classes: Sequence[int]) -> list[RawMap]:
        activations, plan = captures.graphs.fixations(image)
        traced = self.trace(plan, activations, classes)
        height, width = plan.image_hw
        maps = []
        for tag, cls in enumerate(classes):
            xy = image_points(plan, traced, tag)
            kept = xy[inliers(xy, height, width)]
            maps.append(RawMap(density(kept, height, width), cls, self.grid,
                               points=np.unique(kept, axis=0).astype(np.float32)))
        return maps
