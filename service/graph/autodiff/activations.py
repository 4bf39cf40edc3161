"""VJP rules for pointwise activations and Softmax.

Each rule gets the node, the gradients flowing into its outputs (None where none flows)
and which inputs need a gradient; it returns one gradient name (or None) per input.
"""

from __future__ import annotations

import onnx

from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import GraphIndex, attr

Grads = list[str | None]


def relu(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """gx = gy · [x > 0]; guided: Relu(gy) · [x > 0].

    The mask reads the output: y > 0 exactly where x > 0, and a Relu whose input nothing
    else reads is fused into the Conv (or BatchNormalization) before it by ONNX Runtime;
    reading x kept it a separate pass over x on the forward half of the guided graph.
    """
    y, gy = node.output[0], gys[0]
    assert gy is not None
    if b.guided:
        # Guided backprop: only positive gradient passes, and only where the input was > 0.
        gy = b.op("Relu", [gy])
    return [b.op("Mul", [gy, b.mask_positive(y)], hint="grad")]


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


# An affine map by a one-element constant, as hard-sigmoids and hard-swishes are written.
_AFFINE = frozenset({"Add", "Sub", "Mul", "Div"})


def _scalar(index: GraphIndex, name: str) -> float | None:
    """The value of a one-element constant, else None."""
    value = index.constant(name) if name else None
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


def _scalar_operand(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, float] | None:
    """(the other operand, the constant) when ``node`` is an affine map of one tensor by a
    one-element constant: Add, Sub (either order), Mul, or Div by the constant."""
    if node.op_type not in _AFFINE or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, c = node.input
    value_a, value_c = _scalar(index, a), _scalar(index, c)
    if value_c is not None and value_a is None:
        return a, value_c
    if node.op_type != "Div" and value_a is not None and value_c is None:
        return c, value_a
    return None


def clip_is_rectifier(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether guided backprop gates this Clip as a rectifier (ReLU, ReLU6, ReLU-n).

    A Clip is a rectifier when all of:

    1. its min is a constant 0 and its max is absent or a constant > 0 (one element each;
       inputs from opset 11, attributes before);
    2. its input is not shifted: going up from it through Add/Sub/Mul/Div by one-element
       constants (a·x + c), no Add/Sub has a non-zero constant. Hard-sigmoids shift before
       clipping: Keras ``relu6(x + 3) / 6``, ``clip(x / 6 + 0.5, 0, 1)``,
       ``clip(0.2·x + 0.5, 0, 1)``;
    3. its output is not multiplied by its own input: going down from it through Mul/Div
       by one-element constants, no Mul takes as its other operand a tensor of the chain
       of step 2 (hard-swish ``x · relu6(x + 3) / 6`` in any order of the Mul and the /6).

    Any other Clip keeps its true derivative, gy · (min < x < max), under guided backprop
    too. A shift by a per-channel constant (a bias) is not a hard-sigmoid: ``Add(x, b)``
    followed by Clip(0, 6) is a ReLU6 (but a one-element bias, a layer of one unit, reads
    as a shift).
    """
    bounds = []
    for position, name in ((1, "min"), (2, "max")):
        if len(node.input) > position and node.input[position]:
            bounds.append((True, _scalar(index, node.input[position])))
        elif attr(node, name) is not None:
            bounds.append((True, float(attr(node, name))))  # type: ignore[arg-type]
        else:
            bounds.append((False, None))
    (_, low), (has_high, high) = bounds
    if low != 0.0 or (has_high and (high is None or high <= 0.0)):
        return False
    chain = [node.input[0]]
    while (producer := index.producer.get(chain[-1])) is not None:
        affine = _scalar_operand(index, producer)
        if affine is None:
            break
        if producer.op_type in ("Add", "Sub") and affine[1] != 0.0:
            return False  # shifted before clipping: a hard-sigmoid
        chain.append(affine[0])
    pending, seen = [node.output[0]], set()
    while pending:
        tensor = pending.pop()
        seen.add(tensor)
        for consumer in index.consumers.get(tensor, []):
            others = [i for i in consumer.input if i != tensor]
            if consumer.op_type == "Mul" and any(o in chain for o in others):
                return False  # multiplied by its own input: a hard-swish
            affine = _scalar_operand(index, consumer)
            if (affine is not None and consumer.op_type in ("Mul", "Div")
                    and consumer.output[0] not in seen):
                pending.append(consumer.output[0])
    return True


def clip(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """gx = gy · (min < x < max); guided only at a rectifier (:func:`clip_is_rectifier`:
    ReLU6 and the like, not the Clip inside a hard-sigmoid or hard-swish)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    low, high = _clip_bounds(b, node)
    to = b.index.elem_type(x) or onnx.TensorProto.FLOAT
    masks = []
    rectifier = clip_is_rectifier(b.index, node)
    # At a rectifier (min 0 < max) the masks read the output, as Relu's do: y > 0 exactly
    # where x > 0 and y < max exactly where x < max.
    bounded = node.output[0] if rectifier else x
    if rectifier:
        masks.append(b.mask_positive(bounded))
    elif low is not None:
        masks.append(b.op("Cast", [b.op("Greater", [x, low])], to=to))
    if high is not None:
        masks.append(b.op("Cast", [b.op("Less", [bounded, high])], to=to))
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
