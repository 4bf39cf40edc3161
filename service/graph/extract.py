"""Pure graph passes that cut sub-graphs out of a model."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from service.errors import CompileError
from service.graph.onnx_graph import GraphIndex

BATCH = "N"


def value_info(index: GraphIndex, name: str, *, batch: bool = True) -> onnx.ValueInfoProto:
    """A ValueInfo for ``name`` from inferred types; the first axis symbolic when ``batch``."""
    elem = index.elem_type(name)
    shape = index.shape(name)
    if elem is None:
        raise CompileError(f"the element type of tensor {name!r} is unknown")
    dims: list[int | str | None] | None = None
    if shape is not None:
        dims = list(shape)
        if batch and dims:
            dims[0] = BATCH
    return helper.make_tensor_value_info(name, elem, dims)


def extract(index: GraphIndex, inputs: Sequence[str], outputs: Sequence[str], *,
            name: str, batch: bool = True) -> onnx.ModelProto:
    """The sub-graph computing ``outputs`` from ``inputs`` (plus the model's constants).

    Args:
        index: the source model's index.
        inputs: tensors that become graph inputs; nothing upstream of them is kept.
        outputs: tensors that become graph outputs.
        name: the new graph's name.
        batch: make the first axis of inputs and outputs symbolic, so copies can be batched.

    Raises:
        CompileError: if the outputs depend on a graph input not listed in ``inputs``.
    """
    nodes = index.ancestors(outputs, stop=inputs)
    produced = {o for n in nodes for o in n.output} | set(inputs)
    used_inits: list[onnx.TensorProto] = []
    for tensor in {i for n in nodes for i in n.input if i} - produced:
        if tensor in index.initializers:
            used_inits.append(index.initializers[tensor])
        else:
            raise CompileError(
                f"{name}: {', '.join(outputs)} also depend on {tensor!r}, which is not among "
                f"the cut points {', '.join(inputs)}"
            )
    for out in outputs:
        if out not in produced:
            raise CompileError(f"{name}: tensor {out!r} is not computed from {', '.join(inputs)}")
    graph = helper.make_graph(
        nodes,
        name,
        [value_info(index, i, batch=batch) for i in inputs],
        [value_info(index, o, batch=batch) for o in outputs],
        initializer=sorted(used_inits, key=lambda t: t.name),
    )
    return _like(index.model, graph)


def _like(source: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=list(source.opset_import),
                              producer_name="medexplain")
    model.ir_version = source.ir_version
    return model


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without nodes and initializers its outputs do not need."""
    index = GraphIndex(model)
    nodes = index.ancestors(index.graph_outputs)
    used = {i for n in nodes for i in n.input} | set(index.graph_outputs)
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        [i for i in model.graph.input if i.name not in index.initializers],
        list(model.graph.output),
        initializer=[t for t in model.graph.initializer if t.name in used],
    )
    return _like(model, graph)
