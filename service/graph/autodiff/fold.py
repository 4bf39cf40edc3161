"""Folding per-channel scalings of a gradient into the convolution that produced it.

BatchNormalization's input gradient is the output gradient times one constant per
channel (``VjpBuilder.scale_channels``: a 1×1 depthwise Conv, or a Mul by a (1, C, 1, …)
constant). In a pre-activation network (DenseNet: BN → ReLU → Conv) that gradient comes
straight from the next convolution's input gradient, through the rectifier's rule:

    Conv(g, W) → [Relu (guided)] → [Mul by the mask] → scale by s

Scaling commutes with the Mul (s·(a·m) = (s·a)·m), with the guided Relu where s ≥ 0
(s·max(a, 0) = max(s·a, 0)), and s·(W ⋆ g) = (s·W) ⋆ g with s applied to W's output
channels (axis 0, whatever the groups). So the scale becomes part of W at compile time
and its pass over the gradient disappears: on DenseNet-121 that is 61 of the guided
graph's depthwise convolutions. A guided chain whose scale has a negative factor keeps it
(the Relu would then pass the wrong sign).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from service.graph.onnx_graph import attr


def _one_consumer(tensor: str, consumers: dict[str, list[onnx.NodeProto]],
                  outputs: set[str]) -> onnx.NodeProto | None:
    users = consumers.get(tensor, [])
    if len(users) != 1 or tensor in outputs:
        return None
    return users[0]


def _channel_factor(node: onnx.NodeProto, chain: str, consts: dict[str, np.ndarray],
                    rank: int, channels: int) -> np.ndarray | None:
    """The per-channel factors when ``node`` scales ``chain`` (rank ``rank``, ``channels``
    channels) by one constant per channel, else None."""
    if node.op_type == "Conv" and len(node.input) == 2 and node.input[0] == chain:
        w = consts.get(node.input[1])
        plain = all(v == 1 for v in (attr(node, "strides", None) or [1]))  # type: ignore[union-attr]
        plain &= all(v == 1 for v in (attr(node, "dilations", None) or [1]))  # type: ignore[union-attr]
        plain &= not any(attr(node, "pads", None) or [0])  # type: ignore[arg-type]
        plain &= str(attr(node, "auto_pad", "NOTSET")) in ("NOTSET", "VALID")
        if (w is None or not plain or int(attr(node, "group", 1)) != channels  # type: ignore[arg-type]
                or w.shape != (channels, 1, *[1] * (rank - 2))):
            return None
        return w.reshape(channels)
    if node.op_type == "Mul" and chain in node.input:
        other = node.input[1] if node.input[0] == chain else node.input[0]
        c = consts.get(other)
        if c is None or c.ndim > rank:
            return None
        shape = (1,) * (rank - c.ndim) + c.shape
        if shape != (1, channels, *[1] * (rank - 2)):
            return None
        return c.reshape(channels)
    return None


def fold_channel_scales(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """``model`` with each foldable per-channel scale of a generated gradient folded into
    the weights of the Conv that starts its chain (see the module docstring). Only nodes
    and constants whose names start with ``prefix`` (the gradient's) are touched: the
    forward pass keeps its bits. Returns a new model; ``model`` is not modified."""
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer
              if i.name.startswith(prefix)}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()  # positions in graph.node
    position = {id(n): i for i, n in enumerate(graph.node)}
    renamed: dict[str, str] = {}
    weights: dict[str, np.ndarray] = {}
    for conv in graph.node:
        w = consts.get(conv.input[1]) if conv.op_type == "Conv" and len(conv.input) == 2 else None
        if (w is None or not conv.output[0].startswith(prefix)
                or len(consumers.get(conv.input[1], [])) != 1):
            continue
        rank, channels = w.ndim, w.shape[0]
        tensor, through_relu, last = conv.output[0], False, conv
        while (node := _one_consumer(tensor, consumers, outputs)) is not None:
            factor = _channel_factor(node, tensor, consts, rank, channels)
            if factor is not None:
                if through_relu and np.any(factor < 0):
                    break
                weights[conv.input[1]] = (w.astype(np.float64) * factor.astype(np.float64)
                                          .reshape(channels, *[1] * (rank - 1))).astype(w.dtype)
                dropped.add(position[id(node)])
                # The chain's last tensor takes the scaled tensor's name, so its consumers
                # and declared type stay as they were.
                renamed[last.output[0]] = node.output[0]
                break
            if node.op_type == "Relu":
                through_relu = True
            elif not (node.op_type == "Mul" and list(node.input).count(tensor) == 1):
                break
            tensor, last = node.output[0], node
    if not dropped:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for i, n in enumerate(out.graph.node) if i not in dropped]
    for node in nodes:
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    for init in out.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    used = {i for n in nodes for i in n.input}
    kept = [i for i in out.graph.initializer if i.name in used or not i.name.startswith(prefix)]
    out.graph.ClearField("initializer")
    out.graph.initializer.extend(kept)
    infos = [v for v in out.graph.value_info if v.name not in renamed]
    out.graph.ClearField("value_info")
    out.graph.value_info.extend(infos)
    return out


__all__ = ["fold_channel_scales"]
