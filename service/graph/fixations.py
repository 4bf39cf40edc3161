"""CNN Fixations at compile time: the plan of the walk, and the graph that feeds it.

The walk (``service.methods.fixations``) goes from the explained logit back to the image,
one node at a time. :func:`build_plan` turns the ONNX nodes on that path into
:class:`Step` records holding everything the walk needs from the graph (the back-tracking
rule, resolved attributes, constant weights, static shapes) and lists the few tensors whose
values it reads. :func:`expose` is the pure pass that cuts image → logits out of the model
with exactly those tensors as extra outputs.

Mopuri, Garg, Babu, "CNN Fixations: An unraveling approach to visualize the discriminative
image regions", IEEE TIP 2019, https://arxiv.org/abs/1708.06670
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.conv import explicit_pads, window_attrs
from service.graph.extract import extract
from service.graph.onnx_graph import GraphIndex, attr
from service.graph.target import Split, tensor_layout
from service.models.spec import Layout

# Where :func:`expose` records the image layout, so a cached graph rebuilds the same plan.
LAYOUT_KEY = "medexplain.fixations.image_layout"

# Ops that keep every point where it is (activations, normalisation, regularisers).
# LayerNormalization (ConvNeXt's, over the channels of each position, and its head's over
# the pooled vector) is a normalisation like BatchNormalization: statistics of its axes,
# then the same affine map at every point. Erf is GELU's, as legacy exports write it
# (Div → Erf → Add → Mul).
PASS_THROUGH = frozenset({
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "LRN", "Relu",
    "LeakyRelu", "PRelu", "Clip", "Dropout", "Identity", "Sigmoid", "Softmax", "LogSoftmax",
    "HardSwish", "HardSigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Gelu", "Erf",
    "Mish", "Cast",
})
RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze"})
ELEMENTWISE = frozenset({"Add", "Sum", "Sub", "Mul", "Div"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
REDUCES = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean",
                     "ReduceMax", "ReduceSum"})
SUPPORTED = (PASS_THROUGH | RESHAPES | ELEMENTWISE | POOLS | REDUCES
             | {"Conv", "Gemm", "MatMul", "Concat", "Transpose", "Pad", "Resize", "Upsample",
                "Slice", "Split", "Gather"})

_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "align_corners",
                               "asymmetric", "tf_half_pixel_for_nn"})

StaticShape = tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Step:
    """One node of the path, as the walk sees it.

    Attributes:
        rule: the back-tracking rule: "pass", "broadcast", "add", "mul", "concat",
            "reshape", "transpose", "pad", "resize", "slice", "gather", "fc", "conv", "pool" or
            "reduce".
        op_type: the ONNX op.
        name: the node's name (or its output's, when unnamed), for messages.
        output: the tensor whose points the step consumes.
        inputs: the tensors that receive points (image-dependent inputs only).
        input_shapes: static shapes of ``inputs``.
        output_shape: static shape of ``output``.
        attrs: the rule's resolved parameters (pads, strides, axes, offsets, ...).
        weight: constant weights: Conv (M, C/g, kH, kW); Gemm/MatMul (out, in).
        reads: tensors whose values the rule needs.
    """

    rule: str
    op_type: str
    name: str
    output: str
    inputs: tuple[str, ...]
    input_shapes: tuple[StaticShape, ...]
    output_shape: StaticShape
    attrs: Mapping[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    reads: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class FixationPlan:
    """The walk from the logits back to the image.

    Attributes:
        image: the image input.
        image_layout: how ``image`` stores its axes.
        image_shape: its static shape (batch of one).
        logits: where the walk starts.
        logits_shape: its static shape (batch of one).
        steps: the path's nodes in reverse topological order; a Split has one step per
            traced output.
        needed: tensors whose values the walk reads, in graph order.
    """

    image: str
    image_layout: Layout
    image_shape: StaticShape
    logits: str
    logits_shape: StaticShape
    steps: tuple[Step, ...]
    needed: tuple[str, ...]

    @property
    def image_hw(self) -> tuple[int, int]:
        """(height, width) of the model's input grid."""
        if self.image_layout is Layout.NHWC:
            return self.image_shape[1], self.image_shape[2]
        return self.image_shape[2], self.image_shape[3]


def build_plan(model: onnx.ModelProto, split: Split, layout: Layout, *,
               index: GraphIndex | None = None) -> FixationPlan:
    """The steps from ``split.logits`` back to ``split.image``; ``index``: ``model``'s,
    when the caller has it (its shape inference was 7 ms of DenseNet-121's compilation).

    Raises:
        CompileError: when an op on the path has no fixation rule, when a weight is not a
            constant, or when a shape on the path is not static.
    """
    if index is None:
        index = GraphIndex(model)
    assert index.model is model, "the index of another model"
    dynamic = index.descendants([split.image])
    if split.logits not in dynamic:
        raise CompileError(f"fixations: the logits {split.logits!r} do not depend on the image")
    image_shape = _static(index, split.image)
    if len(image_shape) != 4:
        raise CompileError(f"fixations: the image {split.image!r} is not 4-D: {image_shape}")
    reached = {split.logits}
    steps: list[Step] = []
    for node in reversed(index.graph.node):
        hit = [o for o in node.output if o in reached]
        if not hit:
            continue
        if hit != [node.output[0]] and node.op_type != "Split":
            raise CompileError(
                f"fixations: {node.op_type} node {_name(node)!r}: only its first output can "
                "be traced back"
            )
        for out in hit:  # a Split: one step per traced output, each onto the same input
            step = _step(index, node, dynamic, layout, out)
            steps.append(step)
            reached.update(step.inputs)
    if split.image not in reached:
        raise CompileError("fixations: no path traced back from the logits reaches the image")
    reads = {t for s in steps for t in s.reads}
    needed = tuple(t for t in [split.image, *(o for n in index.graph.node for o in n.output)]
                   if t in reads)
    return FixationPlan(split.image, layout, image_shape, split.logits,
                        _static(index, split.logits), tuple(steps), needed)


def exposed(plan: FixationPlan, target: str) -> list[str]:
    """The outputs of :func:`expose`'s graph: logits, ``target``, then what the walk reads."""
    return list(dict.fromkeys([plan.logits, target, *(t for t in plan.needed if t != plan.image)]))


def expose(model: onnx.ModelProto, plan: FixationPlan, target: str) -> onnx.ModelProto:
    """Image → logits, the ``target`` activations and the tensors the walk reads, as a new
    model (``model`` untouched): on a CNN Fixations request its forward pass stands in for
    the backbone's.

    The graph input itself is never an output: the engine hands back the tensor it fed.
    """
    index = GraphIndex(model)
    graph = extract(index, [plan.image], exposed(plan, target), name="fixations", batch=False)
    onnx.helper.set_model_props(graph, {LAYOUT_KEY: plan.image_layout.value})
    return graph


def plan_from_graph(graph: onnx.ModelProto, split: Split) -> FixationPlan:
    """Rebuild the plan from a graph made by :func:`expose` (e.g. read from a cache)."""
    props = {p.key: p.value for p in graph.metadata_props}
    layout = Layout(props.get(LAYOUT_KEY, Layout.NCHW.value))
    return build_plan(graph, split, layout)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _static(index: GraphIndex, name: str) -> StaticShape:
    """The shape of ``name`` with a symbolic batch axis read as 1."""
    shape = index.shape(name)
    if shape is None:
        raise CompileError(f"fixations: the shape of tensor {name!r} is unknown")
    dims = []
    for axis, d in enumerate(shape):
        if isinstance(d, int):
            dims.append(d)
        elif axis == 0:
            dims.append(1)
        else:
            raise CompileError(f"fixations: tensor {name!r} has a non-static shape {shape}")
    return tuple(dims)


def _constant(index: GraphIndex, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
    value = index.constant(name)
    if value is None:
        raise CompileError(
            f"fixations: {node.op_type} node {_name(node)!r}: its {what} {name!r} is not a "
            "constant"
        )
    return value


def _step(index: GraphIndex, node: onnx.NodeProto, dynamic: set[str],
          layout: Layout, out: str) -> Step:
    """The step consuming ``out``, one of ``node``'s outputs (the first but for Split)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in SUPPORTED:
        raise CompileError(
            f"fixations: {op} node {_name(node)!r} has no back-tracking rule (supported: "
            f"{', '.join(sorted(SUPPORTED))})"
        )
    x = node.input[0]

    def make(rule: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             weight: np.ndarray | None = None, reads: tuple[str, ...] = ()) -> Step:
        return Step(rule, op, _name(node), out, tuple(inputs),
                    tuple(_static(index, i) for i in inputs), _static(index, out),
                    attrs or {}, weight, reads)

    if op in PASS_THROUGH or op in RESHAPES or op in ("Slice", "Split"):
        if x not in dynamic:
            raise CompileError(f"fixations: {op} node {_name(node)!r}: its data input is "
                               "constant but another input depends on the image")
        if op == "Slice":
            return make("slice", [x], _slice(index, node))
        if op == "Split":
            return make("slice", [x], _split(index, node, out))
        return make("pass" if op in PASS_THROUGH else "reshape", [x])
    if op == "Gather":
        if x not in dynamic or node.input[1] in dynamic:
            raise CompileError(f"fixations: Gather node {_name(node)!r}: only constant indices "
                               "into an image-dependent tensor can be traced")
        return make("gather", [x], _gather(index, node))
    if op == "Transpose":
        rank = len(_static(index, x))
        given = attr(node, "perm", None)
        perm = [int(p) for p in given or range(rank - 1, -1, -1)]  # type: ignore[union-attr]
        return make("transpose", [x], {"perm": perm})
    if op in ELEMENTWISE:
        return _elementwise(index, node, dynamic, make)
    if op == "Concat":
        rank = len(_static(index, out))
        axis = int(attr(node, "axis")) % rank  # type: ignore[arg-type]
        offsets, inputs, start = [], [], 0
        for name in node.input:
            size = _static(index, name)[axis]
            if name in dynamic:
                inputs.append(name)
                offsets.append(start)
            start += size
        return make("concat", inputs, {"axis": axis, "offsets": offsets})
    if op == "Conv":
        return _conv(index, node, make)
    if op in POOLS:
        return _pool(index, node, make)
    if op in REDUCES:
        return _reduce(index, node, make)
    if op in ("Gemm", "MatMul"):
        return _fc(index, node, dynamic, layout, make)
    if op == "Pad":
        return _pad(index, node, make)
    return _resize(index, node, make)


def _elementwise(index: GraphIndex, node: onnx.NodeProto, dynamic: set[str],
                 make: Any) -> Step:
    op = node.op_type
    inputs = [i for i in node.input if i in dynamic]
    if len(inputs) == 1:
        return make("broadcast", inputs)
    if op in ("Add", "Sum"):
        # Each point goes to the summand with the larger value (the authors' res()).
        return make("add", inputs, reads=tuple(inputs))
    if op == "Mul":
        # SE-style gating: the full-resolution operand carries the points, the gate none.
        # Both operands at full resolution (e.g. Swish x·σ(x)): both get them.
        full = _static(index, node.output[0])
        wide = [i for i in inputs if _static(index, i) == full]
        return make("mul", wide or inputs)
    raise CompileError(
        f"fixations: {op} node {_name(node)!r} of two image-dependent tensors has no "
        "back-tracking rule"
    )


def _window(index: GraphIndex, node: onnx.NodeProto, kernel: list[int]) -> dict[str, Any]:
    x = node.input[0]
    strides, dilations = window_attrs(node, len(kernel))
    # explicit_pads reads only ``.shape`` of its first argument: the index has it.
    begin, _ = explicit_pads(index, node, x, kernel, strides, dilations)  # type: ignore[arg-type]
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": begin}


def _conv(index: GraphIndex, node: onnx.NodeProto, make: Any) -> Step:
    x = node.input[0]
    weight = _constant(index, node, node.input[1], "weight")
    if weight.ndim != 4 or len(_static(index, x)) != 4:
        raise CompileError(f"fixations: Conv node {_name(node)!r}: only 2-D convolutions are "
                           "supported")
    kernel = [int(k) for k in weight.shape[2:]]
    attrs = _window(index, node, kernel)
    attrs["group"] = int(attr(node, "group", 1))  # type: ignore[arg-type]
    return make("conv", [x], attrs, weight=weight, reads=(x,))


def _pool(index: GraphIndex, node: onnx.NodeProto, make: Any) -> Step:
    x = node.input[0]
    kernel = [int(k) for k in attr(node, "kernel_shape")]  # type: ignore[union-attr]
    if len(kernel) != 2:
        raise CompileError(f"fixations: {node.op_type} node {_name(node)!r}: only 2-D pools "
                           "are supported")
    # ceil_mode only changes the output size, which the static shapes already say.
    return make("pool", [x], _window(index, node, kernel), reads=(x,))


def _reduce(index: GraphIndex, node: onnx.NodeProto, make: Any) -> Step:
    x = node.input[0]
    rank = len(_static(index, x))
    if node.op_type.startswith("Global"):
        axes, keepdims = list(range(2, rank)), True
    else:
        raw = attr(node, "axes")
        if raw is None and len(node.input) > 1 and node.input[1]:
            raw = _constant(index, node, node.input[1], "axes").reshape(-1).tolist()
        keepdims = bool(attr(node, "keepdims", 1))
        if raw is None or len(raw) == 0:  # type: ignore[arg-type]
            if attr(node, "noop_with_empty_axes", 0):
                return make("pass", [x])
            raw = list(range(rank))
        axes = sorted(int(a) % rank for a in raw)  # type: ignore[union-attr]
    return make("reduce", [x], {"axes": axes, "keepdims": keepdims}, reads=(x,))


_LOOK_THROUGH = PASS_THROUGH | RESHAPES | {"Transpose"}


def _from_spatial_map(index: GraphIndex, name: str, dynamic: set[str], layout: Layout) -> bool:
    """Whether ``name`` is a 4-D map with H·W > 1, looking through reshapes and
    element-wise ops (fixations.md, pitfall 4)."""
    while True:
        shape = _static(index, name)
        if len(shape) == 4:
            tl = tensor_layout(index, name, layout)
            hw = shape[1] * shape[2] if tl is Layout.NHWC else shape[2] * shape[3]
            return hw > 1
        node = index.producer.get(name)
        if node is None:
            return False
        inputs = [i for i in node.input if i in dynamic]
        if node.op_type in _LOOK_THROUGH:
            name = node.input[0]
        elif node.op_type in ELEMENTWISE and len(inputs) == 1:
            name = inputs[0]
        else:
            return False


def _fc(index: GraphIndex, node: onnx.NodeProto, dynamic: set[str], layout: Layout,
        make: Any) -> Step:
    x, w = node.input[0], node.input[1]
    if x not in dynamic or w in dynamic:
        raise CompileError(f"fixations: {node.op_type} node {_name(node)!r}: only image "
                           "data times constant weights is supported")
    # No copy where the weight is float32 already: a big FC layer's matrix (VGG's is
    # 411 MB) is the model's own read-only array, shared with the sessions.
    weight = _constant(index, node, w, "weight").astype(np.float32, copy=False)
    if weight.ndim != 2:
        raise CompileError(f"fixations: {node.op_type} node {_name(node)!r}: the weight is "
                           f"not a matrix: {weight.shape}")
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            raise CompileError(f"fixations: Gemm node {_name(node)!r}: transA=1 is not "
                               "supported")
        # transB=1: B is (out, in) already, as PyTorch exports; alpha scales every product.
        weight = weight if attr(node, "transB", 0) else weight.T
        alpha = float(attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        if alpha != 1.0:
            weight = weight * np.float32(alpha)
    else:
        weight = weight.T  # MatMul's B is (K, M)
    spatial = _from_spatial_map(index, x, dynamic, layout)
    return make("fc", [x], {"spatial": spatial}, weight=np.ascontiguousarray(weight),
                reads=(x,))


def _pad(index: GraphIndex, node: onnx.NodeProto, make: Any) -> Step:
    x = node.input[0]
    rank = len(_static(index, x))
    if len(node.input) > 1 and node.input[1]:
        pads = _constant(index, node, node.input[1], "pads").reshape(-1).tolist()
    else:
        pads = list(attr(node, "pads", []))  # type: ignore[call-overload]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in _constant(index, node, node.input[3], "axes").tolist()]
    begin = [0] * rank
    for axis, p in zip(axes, pads[:len(axes)]):
        begin[axis] = int(p)
    mode = str(attr(node, "mode", "constant"))
    if mode not in ("constant", "edge", "reflect"):
        raise CompileError(f"fixations: Pad node {_name(node)!r}: mode {mode!r} is not "
                           "supported")
    return make("pad", [x], {"begin": begin, "mode": mode})


def _ints(index: GraphIndex, node: onnx.NodeProto, position: int, name: str,
          ) -> list[int] | None:
    """Integers from optional input ``position`` (a constant), else from attribute ``name``
    (the form before the input existed); None when neither is given."""
    if len(node.input) > position and node.input[position]:
        return [int(v) for v in _constant(index, node, node.input[position],
                                          name).reshape(-1).tolist()]
    raw = attr(node, name)
    return None if raw is None else [int(v) for v in raw]  # type: ignore[union-attr]


def _axis(node: onnx.NodeProto, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise CompileError(f"fixations: {node.op_type} node {_name(node)!r}: axis {axis} is "
                           f"out of range for rank {rank}")
    return axis % rank


def slice_axis(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """(first index, count) that ONNX Slice selects along an axis of size ``dim``: negative
    starts/ends count from the end, then both are clamped ([0, dim] for a positive step,
    start to [0, dim − 1] and end to [−1, dim − 1] for a negative one)."""
    start += dim if start < 0 else 0
    end += dim if end < 0 else 0
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return start, len(range(start, end, step))


def _slice(index: GraphIndex, node: onnx.NodeProto) -> dict[str, Any]:
    """Output index o along each axis comes from input index first + o·step: the per-axis
    first indices and steps over the whole rank (0 and 1 where the axis is not sliced).

    starts/ends/axes/steps are constant inputs from opset 10, attributes before.
    """
    x, out = node.input[0], node.output[0]
    shape, out_shape = _static(index, x), _static(index, out)
    rank = len(shape)
    starts, ends = _ints(index, node, 1, "starts"), _ints(index, node, 2, "ends")
    if starts is None or ends is None or len(starts) != len(ends):
        raise CompileError(f"fixations: Slice node {_name(node)!r}: starts and ends must be "
                           "given, one per axis")
    axes = _ints(index, node, 3, "axes")
    axes = list(range(len(starts))) if axes is None else [_axis(node, a, rank) for a in axes]
    steps = _ints(index, node, 4, "steps") or [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts) or len(set(axes)) != len(axes):
        raise CompileError(f"fixations: Slice node {_name(node)!r}: starts, ends, axes and "
                           "steps must have one entry per distinct axis")
    first, stride = [0] * rank, [1] * rank
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step == 0:
            raise CompileError(f"fixations: Slice node {_name(node)!r}: a step is 0")
        first[axis], count = slice_axis(start, end, step, shape[axis])
        stride[axis] = step
        if count != out_shape[axis]:
            raise CompileError(f"fixations: Slice node {_name(node)!r} selects {count} "
                               f"elements on axis {axis}, its output has {out_shape[axis]}")
    return {"starts": first, "steps": stride}


def _gather(index: GraphIndex, node: onnx.NodeProto) -> dict[str, Any]:
    """Output index (…, i₁…i_r, …) comes from input index indices[i₁…i_r] on ``axis``
    (dynamo exports write as_strided and some slices as a Gather of constant indices)."""
    shape = _static(index, node.input[0])
    axis = _axis(node, int(attr(node, "axis", 0)), len(shape))  # type: ignore[arg-type]
    indices = _constant(index, node, node.input[1], "indices").astype(np.int64)
    if indices.size and (indices.min() < -shape[axis] or indices.max() >= shape[axis]):
        raise CompileError(f"fixations: Gather node {_name(node)!r}: an index is out of "
                           f"range for axis {axis} of size {shape[axis]}")
    return {"axis": axis, "indices": indices % shape[axis]}


def _split(index: GraphIndex, node: onnx.NodeProto, out: str) -> dict[str, Any]:
    """Output k is the input from offset Σ sizes[:k] along the axis (the "slice" rule).

    The sizes: ``split`` (an input from opset 13, an attribute before), else opset 18's
    ``num_outputs`` (chunks of ⌈dim / n⌉, the last one smaller), else equal parts.
    """
    x = node.input[0]
    shape = _static(index, x)
    axis = _axis(node, int(attr(node, "axis", 0)), len(shape))  # type: ignore[arg-type]
    dim, n = shape[axis], len(node.output)
    sizes = _ints(index, node, 1, "split")
    if sizes is None and attr(node, "num_outputs") is not None:
        chunk = -(-dim // n)
        sizes = [chunk] * (n - 1) + [dim - chunk * (n - 1)]
    elif sizes is None:
        sizes = [dim // n] * n if dim % n == 0 else []
    if len(sizes) != n or sum(sizes) != dim or min(sizes) < 0:
        raise CompileError(f"fixations: Split node {_name(node)!r}: cannot split {dim} "
                           f"elements on axis {axis} into {n} outputs (sizes {sizes})")
    k = list(node.output).index(out)
    if _static(index, out)[axis] != sizes[k]:
        raise CompileError(f"fixations: Split node {_name(node)!r}: output {out!r} has "
                           f"{_static(index, out)[axis]} elements on axis {axis}, not {sizes[k]}")
    first = [0] * len(shape)
    first[axis] = sum(sizes[:k])
    return {"starts": first, "steps": [1] * len(shape)}


def _resize(index: GraphIndex, node: onnx.NodeProto, make: Any) -> Step:
    x, out = node.input[0], node.output[0]
    in_shape, out_shape = _static(index, x), _static(index, out)
    scales: list[float] | None = None
    if node.op_type == "Upsample":
        mode, ctm, nearest = str(attr(node, "mode", "nearest")), "asymmetric", "floor"
        raw = attr(node, "scales")
        if raw is None and len(node.input) > 1:
            raw = _constant(index, node, node.input[1], "scales").tolist()
        scales = [float(s) for s in raw]  # type: ignore[union-attr]
    else:
        mode = str(attr(node, "mode", "nearest"))
        ctm = str(attr(node, "coordinate_transformation_mode", "half_pixel"))
        nearest = str(attr(node, "nearest_mode", "round_prefer_floor"))
        if index.opset < 11:
            ctm, nearest = "asymmetric", "floor"
        scales_name = node.input[2] if len(node.input) > 2 else (
            node.input[1] if index.opset < 11 and len(node.input) > 1 else "")
        if scales_name:
            value = _constant(index, node, scales_name, "scales").reshape(-1)
            if value.size:
                axes = attr(node, "axes") or range(len(in_shape))
                full = [1.0] * len(in_shape)
                for axis, s in zip(axes, value.tolist()):  # type: ignore[call-overload]
                    full[int(axis) % len(in_shape)] = float(s)
                scales = full
    if ctm not in _COORDINATE_MODES:
        raise CompileError(f"fixations: {node.op_type} node {_name(node)!r}: "
                           f"coordinate_transformation_mode {ctm!r} is not supported")
    if scales is None:  # sizes given: ONNX Runtime's scale is out / in
        scales = [o / i for o, i in zip(out_shape, in_shape)]
    return make("resize", [x], {"mode": mode, "coordinate_mode": ctm, "nearest_mode": nearest,
                                "scales": scales})
