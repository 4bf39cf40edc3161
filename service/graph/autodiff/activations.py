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


def _guided(b: VjpBuilder, gy: str, positive: str) -> str:
    """Guided backprop at a rectifier: positive gradient, where the input was > 0."""
    return b.op("Mul", [b.op("Relu", [gy]), positive], hint="grad")


def prelu(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    x, slope, gy = node.input[0], node.input[1], gys[0]
    assert gy is not None
    positive = b.mask_positive(x)
    gx = gs = None
    if needs[0]:
        if b.guided:
            gx = _guided(b, gy, positive)
        else:
            # slope' = slope + (1 - slope) * [x > 0], broadcast like the output
            one_minus = b.op("Sub", [b.float_const(1.0, x), slope])
            gx = b.op("Mul", [gy, b.op("Add", [slope, b.op("Mul", [positive, one_minus])])],
                      hint="grad")
    if needs[1]:
        negative = b.op("Sub", [b.float_const(1.0, x), positive])
        gs = b.unbroadcast(b.op("Mul", [b.op("Mul", [gy, x]), negative]), slope, node.output[0])
    return [gx, gs]


def _clip_bounds(b: VjpBuilder, node: onnx.NodeProto) -> tuple[str | None, str | None]:
    """Clip's min and max as tensors (inputs from opset 11, attributes before), or None."""
    bounds: list[str | None] = []
    for position, name in ((1, "min"), (2, "max")):
        if len(node.input) > position and node.input[position]:
            bounds.append(node.input[position])
        elif attr(node, name) is not None:
            bounds.append(b.float_const(float(attr(node, name)), node.input[0]))  # type: ignore[arg-type]
        else:
            bounds.append(None)
    return bounds[0], bounds[1]


def clip(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """gx = gy · (min < x < max); guided at a rectifier (min == 0, e.g. ReLU6)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    low, high = _clip_bounds(b, node)
    to = b.index.elem_type(x) or onnx.TensorProto.FLOAT
    masks = []
    low_value = b.index.constant(low) if low is not None else None
    rectifier = low_value is not None and low_value.size == 1 and float(low_value) == 0.0
    if rectifier:
        masks.append(b.mask_positive(x))
    elif low is not None:
        masks.append(b.op("Cast", [b.op("Greater", [x, low])], to=to))
    if high is not None:
        masks.append(b.op("Cast", [b.op("Less", [x, high])], to=to))
    if b.guided and rectifier:
        gy = b.op("Relu", [gy])
    for mask in masks:
        gy = b.op("Mul", [gy, mask], hint="grad")
    return [gy] + [None] * (len(node.input) - 1)


def hard_sigmoid(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = max(0, min(1, αx + β)): gx = gy · α where 0 < y < 1."""
    y, gy = node.output[0], gys[0]
    assert gy is not None
    alpha = float(attr(node, "alpha", 0.2))  # type: ignore[arg-type]
    to = b.index.elem_type(y) or onnx.TensorProto.FLOAT
    inside = b.op("Mul", [b.mask_positive(y),
                          b.op("Cast", [b.op("Less", [y, b.float_const(1.0, y)])], to=to)])
    return [b.op("Mul", [gy, b.op("Mul", [inside, b.float_const(alpha, y)])], hint="grad")]


def hard_swish(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = x · hs(x), hs = HardSigmoid(1/6, 1/2): y' = hs(x) + x/6 · [−3 < x < 3]."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    to = b.index.elem_type(x) or onnx.TensorProto.FLOAT
    hs = b.op("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
    inside = b.op("Cast", [b.op("Less", [b.op("Abs", [x]), b.float_const(3.0, x)])], to=to)
    ramp = b.op("Mul", [b.op("Mul", [x, b.float_const(1.0 / 6.0, x)]), inside])
    return [b.op("Mul", [gy, b.op("Add", [hs, ramp])], hint="grad")]
