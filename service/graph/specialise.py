"""Compile-time specialisation: a classifier with its input size known, made static.

Exporters compute shapes at run time. PyTorch's legacy exporter turns ``x.chunk(2, 1)`` into
Shape → Gather → Div → Slice and ``x.view(x.size(0), -1)`` into Shape → Gather → Concat →
Reshape; its dynamo exporter writes a fixed batch of one instead (Reshape to ``[1, C]``), so
the head cannot run a batch. The gradient rules and the CNN Fixations planner read shapes,
slice bounds and reshape targets as constants, and the service knows the input size from
model.toml. :func:`specialise` is the pure pass that uses it:

* the image input gets the configured size and channels; its batch axis stays symbolic;
* every node whose value follows from initializers, Constants and the static shapes of
  tensors (Shape, Size, and Gather/Slice/Concat/Div/Mul/Cast/Squeeze/Unsqueeze/Range/
  ConstantOfShape/Equal/Where/... over such values) becomes an initializer under the
  name of its output, provided the value does not depend on the batch size;
* a Reshape whose target depends on the batch (``view(x.size(0), -1)``) or fixes it to one
  (dynamo's ``[1, C]``, while its data's first axis is the batch) gets a constant target
  that copies the batch (``0``, or ``-1`` when ``allowzero`` is set); an Expand whose
  shape depends on the batch gets ``1`` on the axes it keeps from its input; a Resize to
  sizes that fix or copy the batch (dynamo writes ``[1, C, 2H, 2W]``) resizes only the
  other axes (opset 18's ``axes``);
* a Gather from a flattened batch whose indices are computed from the batch size (dynamo's
  ``as_strided``: Reshape(x, [-1]) → Gather(indices = base + b·P), P the elements of one
  image) becomes the same Gather on each image, from x itself: Reshape(x, [-1, P]) →
  Gather(base, axis 1), or, when base reads the image in order (a contiguous view, as
  ConvNeXt's head has), one Reshape(x, [-1, *base.shape]);
* shape-only nodes nobody reads any more are removed; value_info is rewritten from the
  inferred shapes, the batch axis symbolic.

How. The graph is walked once in topological order with two probe batch sizes (1 and 3):
for each node, ONNX's own per-node shape inference (``infer_node_outputs``, fed the values
already known) gives its output types at both sizes, and a node whose inputs are all known
is evaluated with ``onnx.reference`` (the operator specification's reference
implementation). A value equal at both sizes is folded; one that differs depends on the
batch and stays computed at run time (only Reshape, Expand, Resize and Gather are rewritten
so as not to need it). Rewriting as the walk goes means a chain of fixed-batch Reshapes is
seen whole: the shapes downstream of the first rewritten one already carry the batch. At
batch one no value changes anywhere (a fold is the value the node computes; a rewritten
Reshape yields the same shape, a rewritten Gather the same elements); every rewrite is
checked against both probes before it is kept.

Why not a library. onnxsim (a compiled extension that also runs onnx-optimizer passes,
e.g. fusing BatchNormalization into Conv) and onnxslim (pattern fusions, common-
subexpression elimination) do more than this pass needs, and the extra breaks what the
compiler relies on: fused or merged nodes lose the node and tensor names that
``explain.target_layer``, the fixation rules and the guided rule's Clip/ReLU patterns
refer to. And what this pass needs beyond plain folding is not what they are for: folding
only what does not depend on the batch while the batch axis stays open, and turning a
batch fixed to one back into a reshape that batches. Either would be a new dependency
(onnxsim a compiled one, onnxslim its own graph IR) in place of a few hundred lines on two
things onnx already ships: per-node shape inference and the reference evaluator.

Exactness. A fold is at most ``FOLD_LIMIT`` elements; integer values are exact, and a
floating-point value is folded only from ops every IEEE 754 implementation rounds alike
(moves, comparisons, + − × ÷ √, ...), so no folded value differs from ONNX Runtime's in
the last bit. Larger or other constant subgraphs (weights through MatMul, Exp, ...) are
left to ONNX Runtime's own folding.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service.errors import CompileError
from service.graph import weights
from service.graph.onnx_graph import attr, default_opset
from service.models.spec import Layout

# Largest tensor (elements) the pass evaluates or writes as an initializer.
FOLD_LIMIT = 1 << 16
# Batch sizes the graph is specialised at; a value equal at both is batch-independent.
PROBES = (1, 3)
# Floating-point values shape inference is given (a Resize's scales, a Range's bounds):
# no ONNX op's output shape depends on a longer floating-point input, and handing it a
# network's weights (every Conv kernel up to FOLD_LIMIT, twice per node) was a third of this
# pass on DenseNet-121.
_FLOAT_DATA_LIMIT = 16
# The batch axis's name when the model's image input does not name one.
BATCH = "N"

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NEVER_FOLDED = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout", "If", "Loop", "Scan",
})
# Ops whose floating-point results every IEEE 754 implementation rounds alike (moves,
# comparisons, single correctly rounded operations): the only ones folded when an output
# is floating point, so a fold never differs from what ONNX Runtime computes in the last
# bit. Integer (and bool) outputs are exact whatever the op.
_EXACT_FLOAT_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split",
    "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Cast",
    "CastLike", "ConstantOfShape", "Where", "Add", "Sub", "Mul", "Div", "Neg", "Abs",
    "Sqrt", "Reciprocal", "Max", "Min", "Clip", "Relu", "Floor", "Ceil", "Round", "Sign",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "IsNaN", "IsInf",
})
# What evaluating a node may raise; such a node is simply left to run time.
_EVAL_ERRORS = (ArithmeticError, AttributeError, IndexError, KeyError, NotImplementedError,
                RuntimeError, TypeError, ValueError, Warning, onnx.checker.ValidationError)

Dims = tuple[int, ...]


def image_shape(layout: Layout, height: int, width: int, channels: int) -> Dims:
    """The image input's full shape, batch of one, in the model's layout."""
    if layout is Layout.NHWC:
        return (1, height, width, channels)
    return (1, channels, height, width)


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto | None:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    return inputs[0] if len(inputs) == 1 else None


def _declared(info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.shape.dim]


def declared_input_shape(model: onnx.ModelProto) -> list[int | None] | None:
    """The image input's declared shape, None for an axis it leaves open; None when the
    graph has not exactly one input or declares no shape."""
    info = _image_input(model)
    declared = None if info is None else _declared(info)
    if declared is None:
        return None
    return [d if isinstance(d, int) and d > 0 else None for d in declared]


def static_input_shape(model: onnx.ModelProto) -> Dims | None:
    """The image input's shape with a batch of one, when the graph fixes every other axis."""
    dims = declared_input_shape(model)
    if not dims or any(d is None for d in dims[1:]):
        return None
    return (1, *(int(d) for d in dims[1:]))  # type: ignore[arg-type]


def contradiction(model: onnx.ModelProto, input_shape: Sequence[int]) -> str | None:
    """Why the graph's image input cannot take ``input_shape``, or None when it can."""
    info = _image_input(model)
    static = declared_input_shape(model)
    if info is None or static is None:
        return None
    shape = [int(d) for d in input_shape]
    if len(static) == len(shape) and all(
        d is None or d == s for d, s in zip(static, [1, *shape[1:]])
    ):
        return None
    return (f"the graph's image input {info.name!r} has shape "
            f"[{', '.join(str(d) if d is not None else '?' for d in static)}], not "
            f"[{', '.join(map(str, shape))}]")


def specialise(model: onnx.ModelProto, input_shape: Sequence[int]) -> onnx.ModelProto:
    """``model`` specialised to ``input_shape`` (see the module docstring); ``model`` is
    not modified, and is itself the result when there is nothing to change.

    A graph whose image input fixes other sizes than ``input_shape`` (see
    :func:`contradiction`), or which has not exactly one input, is returned as it is: the
    cut and the start-up check (one forward pass at the configured size) say what is wrong.

    Args:
        model: a classifier with one image input.
        input_shape: the image input's full shape, batch of one first, in the model's
            layout (see :func:`image_shape`).

    Raises:
        CompileError: when ``input_shape`` is not a positive shape with a batch of one.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or shape[0] != 1 or min(shape) <= 0:
        raise CompileError(f"the input shape to specialise to must start with a batch of 1 "
                           f"and be positive, not {list(shape)}")
    info = _image_input(model)
    if info is None or contradiction(model, shape) is not None:
        return model
    declared = _declared(info)
    batch = next((d for d in (declared or [])[:1] if isinstance(d, str)), BATCH)
    return _Specialiser(model, info, shape, batch).run()


def _numel(dims: Iterable[int]) -> int:
    return math.prod(int(d) for d in dims)


def _type_of(value: np.ndarray) -> onnx.TypeProto:
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    return helper.make_tensor_type_proto(elem, list(value.shape))


def _dims(t: onnx.TypeProto | None) -> Dims | None:
    """Static dims of a tensor type, else None."""
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = t.tensor_type.shape.dim
    if not all(d.HasField("dim_value") for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def _same(values: Sequence[np.ndarray]) -> bool:
    first = values[0]
    return all(v is first or (v.dtype == first.dtype and v.shape == first.shape
                              and v.tobytes() == first.tobytes()) for v in values[1:])


def _reshaped(data: Dims, target: np.ndarray, allowzero: bool) -> Dims | None:
    """The shape ONNX Reshape gives ``data`` for ``target``, or None when invalid."""
    out: list[int] = []
    free = None
    for i, t in enumerate(int(v) for v in target.reshape(-1)):
        if t == -1:
            if free is not None:
                return None
            free = i
            out.append(1)
        elif t == 0 and not allowzero:
            if i >= len(data):
                return None
            out.append(data[i])
        elif t < 0:
            return None
        else:
            out.append(t)
    total, known = _numel(data), _numel(out)
    if free is not None:
        if known == 0 or total % known:
            return None
        out[free] = total // known
    elif known != total:
        return None
    return tuple(out)


def _broadcast(data: Dims, target: np.ndarray) -> Dims | None:
    """The shape ONNX Expand gives ``data`` for ``target``, or None when invalid."""
    shape = [int(v) for v in target.reshape(-1)]
    rank = max(len(data), len(shape))
    a = [1] * (rank - len(data)) + list(data)
    b = [1] * (rank - len(shape)) + shape
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _batch_agnostic_reshape(data: Sequence[Dims], targets: Sequence[np.ndarray],
                            allowzero: bool) -> np.ndarray | None:
    """A constant Reshape target giving, at every probe, the batch-correct output shape;
    None when the target needs no change or no constant does it."""
    outs = [_reshaped(d, t, allowzero) for d, t in zip(data, targets)]
    first = outs[0]
    if first is None or len({t.size for t in targets}) != 1:
        return None
    constant = _same(targets)
    batch_first = all(d and d[0] == b for d, b in zip(data, PROBES))
    fixed = bool(constant and targets[0].size and int(targets[0].reshape(-1)[0]) == 1
                 and batch_first and first[0] == 1
                 and any(o is None or o[0] != b for o, b in zip(outs, PROBES)))
    if fixed:
        # A batch fixed to one (dynamo's [1, C]): the data's first axis is the batch.
        desired = [(b, *first[1:]) for b in PROBES]
        if any(_numel(d) != _numel(o) for d, o in zip(data, desired)):
            return None
    elif constant or any(o is None for o in outs):
        return None
    else:
        desired = [o for o in outs if o is not None]
    # Static sizes where they do not depend on the batch (the rules and ONNX's own shape
    # inference read them); an entry that changes with it copies it (0) or is inferred (-1).
    target = []
    for axis, column in enumerate(zip(*desired)):
        if len(set(column)) == 1:
            target.append(column[0])
        elif not allowzero and all(axis < len(d) and d[axis] == c for d, c in zip(data, column)):
            target.append(0)
        else:
            target.append(-1)
    result = np.array(target, dtype=np.int64)
    if target.count(-1) > 1 or any(_reshaped(d, result, allowzero) != o
                                   for d, o in zip(data, desired)):
        return None
    return result


def _batch_agnostic_expand(data: Sequence[Dims],
                           targets: Sequence[np.ndarray]) -> np.ndarray | None:
    """A constant Expand shape giving the same output shapes as ``targets`` at every probe;
    None when the shape is batch-independent already or no constant does it."""
    if _same(targets):
        return None
    outs = [_broadcast(d, t) for d, t in zip(data, targets)]
    if any(o is None for o in outs) or len({len(t.reshape(-1)) for t in targets}) != 1:
        return None
    rank = len(outs[0])  # type: ignore[arg-type]
    length = targets[0].size
    shape = []
    for axis in range(rank - length, rank):
        column = [o[axis] for o in outs]  # type: ignore[index]
        offsets = [axis - (rank - len(d)) for d in data]
        if len(set(column)) == 1:
            shape.append(column[0])
        elif all(0 <= k and d[k] == c for d, k, c in zip(data, offsets, column)):
            shape.append(1)
        else:
            return None
    result = np.array(shape, dtype=np.int64)
    if any(_broadcast(d, result) != o for d, o in zip(data, outs)):
        return None
    return result


def _copy_without(message: Message, skip: set[str]) -> Message:
    """A copy of a protobuf message without the fields named in ``skip``."""
    out = type(message)()
    _copy_fields(message, out, skip)
    return out


def _copy_fields(source: Message, target: Message, skip: set[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        into = getattr(target, field.name)
        if hasattr(into, "extend"):
            into.extend(value)
        elif isinstance(value, Message):
            into.CopyFrom(value)
        else:
            setattr(target, field.name, value)


class _Specialiser:
    """One walk over a graph at every probe batch size; :meth:`run` builds the result."""

    def __init__(self, model: onnx.ModelProto, image: onnx.ValueInfoProto, shape: Dims,
                 batch: str) -> None:
        self.model = model
        self.image = image
        self.shape = shape
        self.batch = batch
        self.opset = default_opset(model)
        self.opsets = {imp.domain or "": int(imp.version) for imp in model.opset_import}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.outputs = {o.name for o in model.graph.output}
        self.names = set(self.inits) | {i.name for i in model.graph.input} | {
            o for n in model.graph.node for o in [*n.input, *n.output] if o}
        # Values known at every probe alike (initializers, Constants, folds), and per probe.
        self.constants: dict[str, np.ndarray] = {}
        self.values: list[dict[str, np.ndarray]] = [{} for _ in PROBES]
        elem = image.type.tensor_type.elem_type
        self.types: list[dict[str, onnx.TypeProto]] = [
            {image.name: helper.make_tensor_type_proto(elem, [b, *shape[1:]])} for b in PROBES]
        self._data: list[dict[str, onnx.TensorProto | None]] = [{} for _ in PROBES]
        self.nodes: list[onnx.NodeProto] = []
        self.folded: dict[str, np.ndarray] = {}
        self.added: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        # Tensors a rewrite routed around (a flattened batch): dropped once nobody reads them.
        self.superseded: set[str] = set()

    # What is known about a tensor at probe p.

    def type(self, p: int, name: str) -> onnx.TypeProto | None:
        t = self.types[p].get(name)
        if t is None and name in self.inits:
            init = self.inits[name]
            t = helper.make_tensor_type_proto(init.data_type, list(init.dims))
            for types in self.types:
                types[name] = t
        return t

    def known(self, p: int, name: str) -> bool:
        if name in self.constants or name in self.values[p]:
            return True
        init = self.inits.get(name)
        return init is not None and _numel(init.dims) <= FOLD_LIMIT

    def value(self, p: int, name: str) -> np.ndarray:
        found = self.constants.get(name)
        if found is None:
            found = self.values[p].get(name)
        if found is None:
            found = weights.to_array(self.inits[name])
            self.constants[name] = found
        return found

    def data(self, p: int, name: str) -> onnx.TensorProto | None:
        """``name``'s value for shape inference, when known and small."""
        if not self.known(p, name):
            return None
        cache = self._data[0 if name in self.constants or name in self.inits else p]
        if name not in cache:
            value = self.value(p, name)
            if value.size > FOLD_LIMIT or value.dtype == object or (
                    value.dtype.kind == "f" and value.size > _FLOAT_DATA_LIMIT):
                cache[name] = None
            else:
                cache[name] = numpy_helper.from_array(value, name)
        return cache[name]

    # The walk.

    def run(self) -> onnx.ModelProto:
        for node in self.model.graph.node:
            self.visit(node)
        if not self.folded and not self.added and not self.superseded and (
            self.declared_as_specialised()
        ):
            return self.model
        return self.build()

    def declared_as_specialised(self) -> bool:
        """Whether the graph's inputs and outputs already say what :meth:`build` would."""
        # tf2onnx names the batch axis anew along the graph ('unk__56', 'unk__1289'), so
        # two tensors of one batch look unrelated to the rules: rewrite such shape notes.
        for vi in self.model.graph.value_info:
            for dim in vi.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param != self.batch:
                    return False
        declared = _declared(self.image)
        if declared is None or len(declared) != len(self.shape) or not isinstance(
            declared[0], str
        ) or list(declared[1:]) != list(self.shape[1:]):
            return False
        for output in self.model.graph.output:
            merged = self.merged(output.name)
            dims = _declared(output)
            if merged is None or dims is None or len(dims) != len(merged.tensor_type.shape.dim):
                continue
            if any(m.dim_param == self.batch and d != self.batch
                   for m, d in zip(merged.tensor_type.shape.dim, dims)):
                return False
        return True

    def visit(self, node: onnx.NodeProto) -> None:
        default = node.domain in _DEFAULT_DOMAINS
        if default and node.op_type == "Constant":
            self.constant(node)
            self.nodes.append(node)
            return
        inferred: list[dict[str, onnx.TypeProto]] = []
        results: list[list[np.ndarray] | None] = []
        invariant = self.invariant(node)
        for p in range(len(PROBES)):
            if p and invariant:  # the same inputs give the same types and values
                inferred.append(inferred[0])
                results.append(results[0])
            else:
                inferred.append(self.infer(p, node))
                results.append(self.evaluate(p, node, inferred[p]))
        outs = [o for o in node.output if o]
        if all(r is not None for r in results) and outs and not self.outputs & set(outs) and all(
            _same([r[k] for r in results]) for k in range(len(outs))  # type: ignore[index]
        ):
            for k, out in enumerate(outs):
                self.folded[out] = self.constants[out] = results[0][k]  # type: ignore[index]
                for types in self.types:
                    types[out] = _type_of(results[0][k])  # type: ignore[index]
            return
        if default and node.op_type in ("Reshape", "Expand", "Resize") and len(node.input) > 1:
            rewritten = self.rewrite(node)
            if rewritten is not node:
                node = rewritten
                inferred = [self.infer(p, node) for p in range(len(PROBES))]
        if default and node.op_type == "Gather":
            per_image = self.per_image_gather(node)
            if per_image is not None:
                for extra in per_image[:-1]:
                    self.visit(extra)
                node = per_image[-1]
                inferred = [self.infer(p, node) for p in range(len(PROBES))]
        for p, result in enumerate(results):
            self.types[p].update(inferred[p])
            if result is not None:
                for out, value in zip(outs, result):
                    self.values[p][out] = value
                    self.types[p][out] = _type_of(value)
        self.nodes.append(node)
        self.producer.update((o, node) for o in node.output if o)

    def constant(self, node: onnx.NodeProto) -> None:
        out = node.output[0]
        tensor = next((a.t for a in node.attribute if a.name == "value"
                       and a.type == onnx.AttributeProto.TENSOR), None)
        if tensor is not None:
            for types in self.types:
                types[out] = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
            if _numel(tensor.dims) <= FOLD_LIMIT:
                self.constants[out] = numpy_helper.to_array(tensor)
            return
        value = self.evaluate(0, node)
        if value is not None:
            self.constants[out] = value[0]
            for types in self.types:
                types[out] = _type_of(value[0])

    def invariant(self, node: onnx.NodeProto) -> bool:
        """Whether the node's inputs are the same at every probe."""
        if node.op_type in ("Shape", "Size"):
            dims = [_dims(self.type(p, node.input[0])) for p in range(len(PROBES))]
            return dims[0] is not None and len(set(dims)) == 1
        return all(i in self.constants for i in node.input if i)

    def infer(self, p: int, node: onnx.NodeProto) -> dict[str, onnx.TypeProto]:
        """The node's output types at probe p from ONNX's shape inference; {} if it fails."""
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            return {}
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets.get(domain, 1), domain)
        except onnx.defs.SchemaError:
            return {}
        types, data = {}, {}
        for name in node.input:
            if not name:
                continue
            t = self.type(p, name)
            if t is None:
                return {}
            types[name] = t
            tensor = self.data(p, name)
            if tensor is not None:
                data[name] = tensor
        try:
            return onnx.shape_inference.infer_node_outputs(
                schema, node, types, data, opset_imports=list(self.model.opset_import),
                ir_version=self.model.ir_version)
        except _EVAL_ERRORS + (onnx.shape_inference.InferenceError,):
            return {}

    def evaluate(self, p: int, node: onnx.NodeProto,
                 inferred: dict[str, onnx.TypeProto] | None = None) -> list[np.ndarray] | None:
        """The node's output values at probe p, when they follow from known values and
        static shapes; None otherwise."""
        if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NEVER_FOLDED:
            return None
        op = node.op_type
        if op in ("Shape", "Size"):
            dims = _dims(self.type(p, node.input[0]))
            if dims is None:
                return None
            if op == "Size":
                return [np.array(_numel(dims), dtype=np.int64)]
            start = int(attr(node, "start", 0))  # type: ignore[arg-type]
            end = attr(node, "end", None)
            picked = dims[start:] if end is None else dims[start:int(end)]  # type: ignore[call-overload]
            return [np.array(picked, dtype=np.int64)]
        inputs = [i for i in node.input if i]
        if not all(self.known(p, i) for i in inputs):
            return None
        for out in node.output:
            dims = _dims((inferred or {}).get(out))
            if dims is not None and _numel(dims) > FOLD_LIMIT:
                return None
        feeds = {i: self.value(p, i) for i in inputs}
        if any(v.size > FOLD_LIMIT or v.dtype == object for v in feeds.values()):
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                results = ReferenceEvaluator(node, opsets=self.opsets).run(None, feeds)
        except _EVAL_ERRORS:
            return None
        values = []
        for out, result in zip(node.output, results):
            if not isinstance(result, np.ndarray) or result.dtype == object or (
                result.size > FOLD_LIMIT
            ):
                return None
            if result.dtype.kind in "fc" and op not in _EXACT_FLOAT_OPS:
                return None
            expected = (inferred or {}).get(out)
            if expected is not None and expected.HasField("tensor_type") and (
                expected.tensor_type.elem_type
                and expected.tensor_type.elem_type != helper.np_dtype_to_tensor_dtype(result.dtype)
            ):
                return None
            values.append(result)
        return values

    def rewrite(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """A Reshape, Expand or Resize whose shape input no longer depends on the batch, or
        ``node`` itself."""
        position = 3 if node.op_type == "Resize" else 1
        data = node.input[0]
        shape = node.input[position] if len(node.input) > position else ""
        dims = [_dims(self.type(p, data)) for p in range(len(PROBES))]
        if not shape or any(d is None for d in dims) or not all(
            self.known(p, shape) for p in range(len(PROBES))
        ):
            return node
        targets = [self.value(p, shape) for p in range(len(PROBES))]
        axes: list[int] | None = None
        if node.op_type == "Reshape":
            allowzero = self.opset >= 14 and bool(attr(node, "allowzero", 0))
            new = _batch_agnostic_reshape(dims, targets, allowzero)  # type: ignore[arg-type]
        elif node.op_type == "Expand":
            new = _batch_agnostic_expand(dims, targets)  # type: ignore[arg-type]
        else:
            found = self.resize(node, dims, targets)  # type: ignore[arg-type]
            if found is None:
                return node
            axes, new = found
        if new is None:
            return node
        name = self.new_constant(f"{shape}/any_batch", new)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[position] = name
        if axes is not None:
            kept = [a for a in copy.attribute if a.name != "axes"]
            del copy.attribute[:]
            copy.attribute.extend([*kept, helper.make_attribute("axes", axes)])
        return copy

    def per_image_gather(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """The nodes replacing a Gather from a flattened batch at indices base + b·P (the
        last one has the Gather's name and output), or None when ``node`` is not one.

        torch's dynamo exporter writes ``x.as_strided(size, stride)`` as Reshape(x, [-1])
        and a Gather whose flat positions it computes from the batch size (Range(0, N)·P
        plus the offsets of one image), so the indices are never a constant and the flat
        tensor's length is N·P, neither static nor the batch: the fixation rules and the
        gradient's static sizes see neither. When at every probe batch b the indices are
        (b, *R)-shaped with row k equal to row 0 plus k·P, and row 0 stays inside one
        image (0 ≤ base < P), image k reads only its own P elements at the same offsets,
        whatever the batch: the same Gather applied to each image's row of x.
        """
        data, indices = node.input[0], node.input[1] if len(node.input) > 1 else ""
        flat = [_dims(self.type(p, data)) for p in range(len(PROBES))]
        source = self.producer.get(data)
        if not indices or source is None or source.op_type != "Reshape" or (
            source.domain not in _DEFAULT_DOMAINS
        ) or any(d is None or len(d) != 1 for d in flat):
            return None
        x = source.input[0]
        dims = [_dims(self.type(p, x)) for p in range(len(PROBES))]
        if any(d is None or not d or d[0] != b for d, b in zip(dims, PROBES)):
            return None
        per = _numel(dims[0][1:])  # type: ignore[index]
        if per == 0 or int(attr(node, "axis", 0)) not in (0, -1) or any(  # type: ignore[call-overload]
            d[0] != b * per for d, b in zip(flat, PROBES)  # type: ignore[index]
        ) or not all(self.known(p, indices) for p in range(len(PROBES))):
            return None
        values = [self.value(p, indices) for p in range(len(PROBES))]
        base = values[0][0] if values[0].ndim and values[0].shape[0] == 1 else None
        if base is None or base.dtype.kind not in "iu" or _same(values) or (
            base.size and (base.min() < 0 or base.max() >= per)
        ):
            return None
        for value, b in zip(values, PROBES):
            if value.shape != (b, *base.shape) or any(
                not np.array_equal(value[k], base + k * per) for k in range(b)
            ):
                return None
        self.superseded.add(data)
        if base.size == per and np.array_equal(base.reshape(-1), np.arange(per)):
            # Image k's elements in order: a reshape of x, no Gather left.
            return [self.reshape(x, [-1, *base.shape], node.name, node.output[0])]
        rows = self.reshape(x, [-1, per], self.fresh(f"{node.name}/per_image"),
                            self.fresh(f"{data}/per_image"))
        name = self.new_constant(f"{indices}/per_image", base)
        gather = onnx.NodeProto()
        gather.CopyFrom(node)
        gather.input[:] = [rows.output[0], name]
        del gather.attribute[:]
        gather.attribute.append(helper.make_attribute("axis", 1))
        return [rows, gather]

    def reshape(self, data: str, shape: list[int], name: str, output: str) -> onnx.NodeProto:
        """A Reshape of ``data`` to the constant ``shape``."""
        target = self.new_constant(f"{output}/shape", np.array(shape, dtype=np.int64))
        return helper.make_node("Reshape", [data, target], [output], name=name)

    def new_constant(self, hint: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``, known at every probe; its name."""
        name = self.fresh(hint)
        self.added[name] = self.constants[name] = value
        for types in self.types:
            types[name] = _type_of(value)
        return name

    def resize(self, node: onnx.NodeProto, data: Sequence[Dims],
               targets: Sequence[np.ndarray]) -> tuple[list[int], np.ndarray] | None:
        """(axes, sizes) for a Resize to sizes that fix or copy the batch: the same sizes
        without the batch axis, which opset 18's ``axes`` then leaves as it is."""
        rank = len(data[0])
        if self.opset < 18 or str(attr(node, "keep_aspect_ratio_policy", "stretch")) != (
            "stretch"
        ) or any(len(d) != rank for d in data):
            return None
        axes = [int(a) % rank for a in attr(node, "axes", None) or range(rank)]  # type: ignore[union-attr]
        sizes = [[int(v) for v in t.reshape(-1)] for t in targets]
        if 0 not in axes or any(len(s) != len(axes) for s in sizes):
            return None
        k = axes.index(0)
        rest = [[v for i, v in enumerate(s) if i != k] for s in sizes]
        if any(r != rest[0] for r in rest):
            return None  # another axis depends on the batch
        batch_first = all(d[0] == b for d, b in zip(data, PROBES))
        copies = all(s[k] == d[0] for s, d in zip(sizes, data))
        fixed = batch_first and all(s[k] == 1 for s in sizes)
        if not (copies or fixed) or (copies and _same(list(targets))):
            return None  # sizes constant and right at every batch already, or not the batch
        return [a for a in axes if a != 0], np.array(rest[0], dtype=np.int64)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    # The result.

    def merged(self, name: str) -> onnx.TypeProto | None:
        """``name``'s type over all probes: equal dims static, the batch symbolic."""
        types = [t.get(name) for t in self.types]
        if any(t is None or not t.HasField("tensor_type") for t in types):
            return None
        elems = {t.tensor_type.elem_type for t in types}  # type: ignore[union-attr]
        if len(elems) != 1 or not next(iter(elems)):
            return None
        shapes = [_shape_of(t) for t in types]  # type: ignore[arg-type]
        if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:  # type: ignore[arg-type]
            return helper.make_tensor_type_proto(next(iter(elems)), None)
        dims: list[int | str | None] = []
        for column in zip(*shapes):  # type: ignore[misc]
            if None not in column and len(set(column)) == 1:
                dims.append(column[0])
            elif column == PROBES:
                dims.append(self.batch)
            else:
                dims.append(None)
        return helper.make_tensor_type_proto(next(iter(elems)), dims)

    def build(self) -> onnx.ModelProto:
        graph = self.model.graph
        nodes = [n for n in self.nodes if not all(o in self.folded for o in n.output if o)]
        known = set(self.constants) | set(self.values[0]) | set(self.values[1])
        uses = Counter(i for n in nodes for i in n.input if i)
        uses.update(self.outputs)
        kept: list[onnx.NodeProto] = []
        for node in reversed(nodes):
            outs = [o for o in node.output if o]
            if all(o in known or o in self.superseded for o in outs) and not any(
                uses[o] for o in outs
            ):
                # Shape-only (or routed around by a rewrite) and read by no one.
                uses.subtract(i for i in node.input if i)
                continue
            kept.append(node)
        kept.reverse()
        used = {i for n in kept for i in n.input if i} | self.outputs
        originally = {i for n in graph.node for i in n.input if i} | self.outputs
        dropped = {name for name in self.inits if name in originally and name not in used}
        new_inits = {name: value for name, value in [*self.folded.items(), *self.added.items()]
                     if name in used}

        result = _copy_without(self.model, {"graph"})
        out_graph = result.graph
        _copy_fields(graph, out_graph, {"node", "initializer", "input", "output", "value_info"})
        out_graph.node.extend(kept)
        out_graph.initializer.extend(t for t in graph.initializer if t.name not in dropped)
        out_graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name)
                                     for name, v in new_inits.items())
        for inp in graph.input:
            if inp.name in dropped:
                continue
            copy = out_graph.input.add()
            copy.CopyFrom(inp)
            if inp.name == self.image.name:
                dims = copy.type.tensor_type.shape.dim
                del dims[:]
                for k, size in enumerate(self.shape):
                    dim = dims.add()
                    if k == 0:
                        dim.dim_param = self.batch
                    else:
                        dim.dim_value = size
        if self.model.ir_version < 4:  # initializers must be graph inputs there
            for name, value in new_inits.items():
                out_graph.input.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype),
                    list(np.asarray(value).shape)))
        for output in graph.output:
            copy = out_graph.output.add()
            copy.CopyFrom(output)
            merged = self.merged(output.name)
            declared = copy.type.tensor_type.shape.dim
            if merged is not None and merged.tensor_type.HasField("shape") and len(
                merged.tensor_type.shape.dim
            ) == len(declared):
                for dim, inferred in zip(declared, merged.tensor_type.shape.dim):
                    if inferred.dim_param == self.batch:
                        dim.Clear()
                        dim.dim_param = self.batch
        existing = {vi.name: vi for vi in graph.value_info}
        skip = set(self.outputs) | {i.name for i in graph.input} | set(new_inits) | set(
            self.inits)
        for node in kept:
            for out in node.output:
                if not out or out in skip:
                    continue
                merged = self.merged(out)
                if merged is not None:
                    out_graph.value_info.append(helper.make_value_info(out, merged))
                elif out in existing:
                    out_graph.value_info.append(existing[out])
        return result


def _shape_of(t: onnx.TypeProto) -> tuple[int | None, ...] | None:
    if not t.tensor_type.HasField("shape"):
        return None
    return tuple(int(d.dim_value) if d.HasField("dim_value") else None
                 for d in t.tensor_type.shape.dim)
