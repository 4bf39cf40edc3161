"""Read-only indices over an ONNX graph: producers, consumers, shapes, constant values."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from service.errors import CompileError

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
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
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
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            self._types[vi.name] = vi.type
        self._constants: dict[str, np.ndarray] = {
            name: numpy_helper.to_array(init) for name, init in self.initializers.items()
        }
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
                if value is not None:
                    self._constants[node.output[0]] = value

    def shape(self, name: str) -> Shape | None:
        """The inferred shape of a tensor, or None when its rank is unknown."""
        if name in self._constants:
            return tuple(int(d) for d in self._constants[name].shape)
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
        return self._constants.get(name)

    def is_constant(self, name: str) -> bool:
        return name in self._constants

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
