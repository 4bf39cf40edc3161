"""VJP rules for pointwise activations and Softmax.

Each rule gets the node, the gradients flowing into its outputs (None where none flows)
and which inputs need a gradient; it returns one gradient name (or None) per input.
"""

from __future__ import annotations

import onnx

from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def relu(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, gy = node.input[0], gys[0]
    assert gy is not None
    if b.guided:
        # Guided backprop: only positive gradient passes, and only where the input was > 0.
        gy = b.op("Relu", [gy])
    return [b.op("Mul", [gy, b.mask_positive(x)], hint="grad")]


def leaky_relu(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, gy = node.input[0], gys[0]
    assert gy is not None
    alpha = float(attr(node, "alpha", 0.01))  # type: ignore[arg-type]
    positive = b.mask_positive(x)
    if b.guided:
        return [b.op("Mul", [b.op("Relu", [gy]), positive], hint="grad")]
    # slope = alpha + (1 - alpha) * [x > 0]
    slope = b.op("Add", [b.float_const(alpha, x),
                         b.op("Mul", [positive, b.float_const(1.0 - alpha, x)])])
    return [b.op("Mul", [gy, slope], hint="grad")]


def sigmoid(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    y, gy = node.output[0], gys[0]
    assert gy is not None
    one_minus = b.op("Sub", [b.float_const(1.0, y), y])
    return [b.op("Mul", [b.op("Mul", [gy, y]), one_minus], hint="grad")]


def tanh(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    y, gy = node.output[0], gys[0]
    assert gy is not None
    one_minus_sq = b.op("Sub", [b.float_const(1.0, y), b.op("Mul", [y, y])])
    return [b.op("Mul", [gy, one_minus_sq], hint="grad")]


def softmax(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    # From opset 13 Softmax normalises along one axis (default -1), which this rule assumes;
    # the builder refuses older opsets.
    y, gy = node.output[0], gys[0]
    assert gy is not None
    axis = int(attr(node, "axis", -1))  # type: ignore[arg-type]
    dot = b.reduce("ReduceSum", b.op("Mul", [gy, y]), [axis], keepdims=True)
    return [b.op("Mul", [y, b.op("Sub", [gy, dot])], hint="grad")]


def log_softmax(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    y, gy = node.output[0], gys[0]
    assert gy is not None
    axis = int(attr(node, "axis", -1))  # type: ignore[arg-type]
    total = b.reduce("ReduceSum", gy, [axis], keepdims=True)
    return [b.op("Sub", [gy, b.op("Mul", [b.op("Exp", [y]), total])], hint="grad")]
