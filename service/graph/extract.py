"""Pure graph passes that cut sub-graphs out of a model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import CompileError
from service.graph.onnx_graph import GraphIndex, attr

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
    nodes = []
    added: list[onnx.TensorProto] = []
    for node in index.ancestors(outputs, stop=inputs):
        rewritten = shape_from_cut(index, node, inputs[0]) if inputs else None
        if rewritten is None:
            nodes.append(node)
        else:
            nodes.extend(rewritten[0])
            added.extend(rewritten[1])
    produced = {o for n in nodes for o in n.output} | set(inputs) | {t.name for t in added}
    used_inits: list[onnx.TensorProto] = list(added)
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


def shape_from_cut(index: GraphIndex, node: onnx.NodeProto, cut: str
                   ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """A Shape of a graph input rebuilt from the cut tensor, or None when it is not one.

    The input's sizes past the batch are static (the specialisation made them so) and its
    batch is the cut tensor's; so Shape(image) = Concat(Shape(cut)[:1], its static sizes),
    sliced as the node's start/end say. Nodes and constants are named after the node.
    """
    source = node.input[0] if node.input else ""
    if node.op_type != "Shape" or source not in index.graph_inputs:
        return None
    dims, cut_dims = index.shape(source), index.shape(cut)
    if not dims or not cut_dims or not all(isinstance(d, int) for d in dims[1:]):
        return None
    if not (dims[0] == cut_dims[0] and dims[0] is not None):
        return None
    name = f"xai/cut/{node.output[0]}"
    first = numpy_helper.from_array(np.array([0], np.int64), f"{name}/0")
    second = numpy_helper.from_array(np.array([1], np.int64), f"{name}/1")
    rest = numpy_helper.from_array(np.array(dims[1:], np.int64), f"{name}/rest")
    nodes = [
        helper.make_node("Shape", [cut], [f"{name}/cut_shape"], name=f"{name}/shape"),
        helper.make_node("Slice", [f"{name}/cut_shape", first.name, second.name],
                         [f"{name}/batch"], name=f"{name}/batch"),
    ]
    start, end = attr(node, "start", 0), attr(node, "end", None)
    full = node.output[0] if start == 0 and end is None else f"{name}/full"
    nodes.append(helper.make_node("Concat", [f"{name}/batch", rest.name], [full], axis=0,
                                  name=f"{name}/concat"))
    inits = [first, second, rest]
    if full != node.output[0]:
        bounds = [numpy_helper.from_array(np.array([v], np.int64), f"{name}/{k}")
                  for k, v in (("start", start), ("end", end if end is not None
                                                       else len(dims)))]
        nodes.append(helper.make_node("Slice", [full, bounds[0].name, bounds[1].name],
                                      [node.output[0]], name=f"{name}/slice"))
        inits += bounds
    return nodes, inits


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
