"""Vision-transformer tokens as an NCHW target layer: the pure graph pass.

A ViT layer's activations are tokens (B, N, C): ``prefix`` leading tokens (class,
distillation, register tokens) and then the h·w patch tokens in row-major order of the
patch grid (timm's PatchEmbed: a strided Conv, ``flatten(2).transpose(1, 2)``). The
explanation map lives on that grid, so the pass cuts the token tensor into

- ``GRID``: the patch tokens as (B, C, h, w), the target every method reads, and
- ``PREFIX``: the prefix tokens (B, prefix, C), the *context* the head reads beside the
  grid and holds at the image's own values,

and joins them again for the rest of the network, so the head is computed from
(GRID, PREFIX) and differentiated with respect to GRID alone. This is pytorch-grad-cam's
``reshape_transform`` (drop the class token, reshape to the patch grid) done in the graph:
the gradients that reach the grid are autograd's for the token tensor, the prefix tokens'
are dropped, and CRM's masked copies zero patch tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import CompileError

_NAME = "xai/tokens/"
GRID = f"{_NAME}grid"
PREFIX = f"{_NAME}prefix"
JOINED = f"{_NAME}joined"


@dataclass(frozen=True)
class TokenGrid:
    """Where a token tensor's patch grid is.

    Attributes:
        tokens: the (B, N, C) tensor.
        prefix: how many leading tokens are not patches (N − height·width).
        channels, height, width: C and the patch grid.
    """

    tokens: str
    prefix: int
    channels: int
    height: int
    width: int


def regrid(model: onnx.ModelProto, grid: TokenGrid) -> onnx.ModelProto:
    """A copy of ``model`` in which ``grid.tokens`` is read through GRID (and PREFIX).

    Every consumer of the token tensor reads JOINED instead, which equals it: Concat of
    PREFIX and GRID transposed and reshaped back to tokens. The new nodes sit right after
    the token tensor's producer, so the graph stays topologically sorted.

    Raises:
        CompileError: when the token tensor is not computed by a node of the graph.
    """
    c, h, w, p = grid.channels, grid.height, grid.width, grid.prefix
    consts = {
        "start": [p], "end": [p + h * w], "axis": [1], "zero": [0], "prefix_end": [p],
        "hwc": [-1, h, w, c], "tokens": [-1, h * w, c],
    }
    inits = [numpy_helper.from_array(np.array(v, np.int64), f"{_NAME}{k}")
             for k, v in consts.items() if p > 0 or k not in ("zero", "prefix_end")]
    n = _NAME
    added = [
        helper.make_node("Slice", [grid.tokens, f"{n}start", f"{n}end", f"{n}axis"],
                         [f"{n}patches"], name=f"{n}patches"),
        helper.make_node("Reshape", [f"{n}patches", f"{n}hwc"], [f"{n}patches_hwc"],
                         name=f"{n}patches_hwc"),
        helper.make_node("Transpose", [f"{n}patches_hwc"], [GRID], perm=[0, 3, 1, 2],
                         name=GRID),
        helper.make_node("Transpose", [GRID], [f"{n}grid_hwc"], perm=[0, 2, 3, 1],
                         name=f"{n}grid_hwc"),
    ]
    if p > 0:
        added += [
            helper.make_node("Slice", [grid.tokens, f"{n}zero", f"{n}prefix_end", f"{n}axis"],
                             [PREFIX], name=PREFIX),
            helper.make_node("Reshape", [f"{n}grid_hwc", f"{n}tokens"], [f"{n}grid_tokens"],
                             name=f"{n}grid_tokens"),
            helper.make_node("Concat", [PREFIX, f"{n}grid_tokens"], [JOINED], axis=1,
                             name=JOINED),
        ]
    else:
        added.append(helper.make_node("Reshape", [f"{n}grid_hwc", f"{n}tokens"], [JOINED],
                                      name=JOINED))
    nodes: list[onnx.NodeProto] = []
    placed = False
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            if name == grid.tokens:
                copy.input[i] = JOINED
        nodes.append(copy)
        if grid.tokens in node.output:
            nodes.extend(added)
            placed = True
    if not placed:
        raise CompileError(f"token tensor {grid.tokens!r} is not computed by a node")
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input),
                              list(model.graph.output),
                              initializer=[*model.graph.initializer, *inits],
                              value_info=list(model.graph.value_info))
    out = helper.make_model(graph, opset_imports=list(model.opset_import),
                            producer_name=model.producer_name)
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out
