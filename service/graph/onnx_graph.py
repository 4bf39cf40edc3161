"""Read-only indices over an ONNX graph: producers, consumers, shapes, constant values."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from service.errors import CompileError
from service.graph import weights

Dim = int | str | None
Shape = tuple[Dim, ...]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise CompileError("the model imports no version of the default ONNX operator set")


class GraphIndex:
    """Lookup tables for one graph; never mutates it.

    Shapes come from ONNX shape inference run on a copy, so a dimension is an int when
    static, a string when symbolic (e.g. the batch axis) and None when unknown.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(without_weights(model),
                                                         data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise CompileError(f"ONNX shape inference failed: {exc}") from exc
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in self.graph.output]
        self._types: dict[str, onnx.TypeProto] = {}
        self._shapes: dict[str, Shape | None] = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            self._types[vi.name] = vi.type
        # Initializer values are converted when first asked for: most rules read a few
        # small ones, and converting every weight of a big network up front cost seconds
        # and a copy of all its weights per index.
        self._constants: dict[str, np.ndarray] = {}
        self._constant_nodes: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                self._constant_nodes[node.output[0]] = node

    def shape(self, name: str) -> Shape | None:
        """The inferred shape of a tensor, or None when its rank is unknown."""
        # Remembered: the rules and the fixations plan ask for the same shapes again and
        # again (3,200 calls in DenseNet-121's compilation, each reading the proto).
        if name not in self._shapes:
            self._shapes[name] = self._shape(name)
        return self._shapes[name]

    def _shape(self, name: str) -> Shape | None:
        if name in self.initializers:
            return tuple(int(d) for d in self.initializers[name].dims)
        if name in self._constant_nodes:
            value = self.constant(name)
            return None if value is None else tuple(int(d) for d in value.shape)
        t = self._types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        dims: list[Dim] = []
        for d in t.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return tuple(dims)

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return int(self.initializers[name].data_type)
        t = self._types.get(name)
        if t is None or not t.HasField("tensor_type"):
            return None
        return int(t.tensor_type.elem_type)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        if name not in self._constants:
            if name in self.initializers:
                self._constants[name] = weights.to_array(self.initializers[name])
            elif name in self._constant_nodes:
                value = _constant_node_value(self._constant_nodes[name])
                if value is None:
                    return None
                self._constants[name] = value
            else:
                return None
        return self._constants[name]

    def is_constant(self, name: str) -> bool:
        return self.constant(name) is not None

    def descendants(self, names: Iterable[str]) -> set[str]:
        """The tensors computed from ``names`` (``names`` included)."""
        found = set(names)
        for node in self.graph.node:
            if any(i in found for i in node.input if i):
                found.update(o for o in node.output if o)
        return found

    def ancestors(self, names: Iterable[str], stop: Iterable[str] = ()) -> list[onnx.NodeProto]:
        """Nodes needed to compute ``names``, not looking past ``stop``; in graph order."""
        stop_set = set(stop)
        needed: set[int] = set()
        pending = [n for n in names if n not in stop_set]
        seen: set[str] = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is None:
                continue
            needed.add(id(node))
            pending.extend(i for i in node.input if i and i not in stop_set)
        return [n for n in self.graph.node if id(n) in needed]


# Initializers up to this size keep their values for shape inference: shape arithmetic
# (Reshape targets, Slice bounds) reads them; weights are only ever shapes to it.
_INFERENCE_VALUE_BYTES = 1024


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs, for shape
    inference: it serialises the model it is given, and on a 500 MB network that copy
    cost more than everything else the compiler does."""
    keep, declared = [], []
    for init in model.graph.initializer:
        size = len(init.raw_data) if init.HasField("raw_data") else init.ByteSize()
        if size <= _INFERENCE_VALUE_BYTES and not weights.is_offloaded(init):
            keep.append(init)
        else:
            declared.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                               list(init.dims)))
    if not declared:
        return model
    inputs = [i for i in model.graph.input if i.name not in {d.name for d in declared}]
    graph = onnx.helper.make_graph(list(model.graph.node), model.graph.name,
                                   [*inputs, *declared], list(model.graph.output),
                                   initializer=keep, value_info=list(model.graph.value_info))
    light = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    light.ir_version = model.ir_version
    light.functions.extend(model.functions)
    return light


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """A node attribute as a Python value (ints, floats, strings, lists)."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
