"""VJP rules for broadcasting arithmetic: Add, Sub, Mul, Div, Neg, Pow, Mod, the variadic Sum,
Mean, Max and Min, and Where."""

from __future__ import annotations

import numpy as np
import onnx

from service.graph.autodiff.builder import VjpBuilder
from service.graph.autodiff.constants import FLOAT_TYPES

Grads = list[str | None]


def add(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Add, and variadic Sum: every input gets gy, reduced to its shape."""
    gy, y = gys[0], node.output[0]
    assert gy is not None
    return [b.unbroadcast(gy, x, y) if need else None for x, need in zip(node.input, needs)]


def sub(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    gy, y = gys[0], node.output[0]
    assert gy is not None
    ga = b.unbroadcast(gy, node.input[0], y) if needs[0] else None
    gb = b.unbroadcast(b.op("Neg", [gy]), node.input[1], y) if needs[1] else None
    return [ga, gb]


def mul(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    gy, y = gys[0], node.output[0]
    assert gy is not None
    a, c = node.input[0], node.input[1]
    ga = b.unbroadcast(b.op("Mul", [gy, c]), a, y) if needs[0] else None
    gc = b.unbroadcast(b.op("Mul", [gy, a]), c, y) if needs[1] else None
    return [ga, gc]


def div(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    gy, y = gys[0], node.output[0]
    assert gy is not None
    a, c = node.input[0], node.input[1]
    ga = b.unbroadcast(b.op("Div", [gy, c]), a, y) if needs[0] else None
    gc = None
    if needs[1]:
        # d(a/c)/dc = -a/c² = -y/c
        gc = b.unbroadcast(b.op("Neg", [b.op("Div", [b.op("Mul", [gy, y]), c])]), c, y)
    return [ga, gc]


def neg(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    assert gys[0] is not None
    return [b.op("Neg", [gys[0]], hint="grad")]


def pow_(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = xᵖ: gx = gy · p · xᵖ⁻¹, gp = gy · y · ln x (defined for x > 0, as the power is).

    A constant scalar exponent (x² in a decomposed LayerNorm) folds into constants; the
    exponent may have an integer type (allowed from opset 12), which is cast to x's.
    """
    gy, y = gys[0], node.output[0]
    assert gy is not None
    x, p = node.input[0], node.input[1]
    gx = gp = None
    if needs[0]:
        value = b.index.constant(p)
        if value is not None and value.size == 1:
            e = float(value.reshape(-1)[0])
            if e == 0.0:
                slope = b.float_const(0.0, x)
            elif e == 1.0:
                slope = None
            elif e == 2.0:
                slope = b.op("Mul", [x, b.float_const(2.0, x)])
            else:
                power = b.op("Pow", [x, b.float_const(e - 1.0, x)])
                slope = b.op("Mul", [power, b.float_const(e, x)])
        else:
            exponent = p
            if b.index.elem_type(p) != b.index.elem_type(x):
                exponent = b.op("Cast", [p], to=b.index.elem_type(x) or onnx.TensorProto.FLOAT)
            power = b.op("Pow", [x, b.op("Sub", [exponent, b.float_const(1.0, x)])])
            slope = b.op("Mul", [power, exponent])
        g = gy if slope is None else b.op("Mul", [gy, slope])
        gx = b.unbroadcast(g, x, y)
    if needs[1] and b.index.elem_type(p) in FLOAT_TYPES:
        gp = b.unbroadcast(b.op("Mul", [b.op("Mul", [gy, y]), b.op("Log", [x])]), p, y)
    return [gx, gp]


def mean(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Variadic Mean: gy / n to every input, reduced to its shape."""
    gy, y = gys[0], node.output[0]
    assert gy is not None
    share = b.op("Mul", [gy, b.float_const(1.0 / len(node.input), y)])
    return [b.unbroadcast(share, x, y) if need else None for x, need in zip(node.input, needs)]


def extremum(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Variadic Max / Min with broadcasting: gy goes to the input(s) equal to the output.

    Ties share it equally (a subgradient; torch.maximum splits a tie the same way), so the
    gradients sum to gy everywhere.
    """
    gy, y = gys[0], node.output[0]
    assert gy is not None
    if len(node.input) == 1:
        return [gy]
    to = b.index.elem_type(y) or onnx.TensorProto.FLOAT
    hits = [b.op("Cast", [b.op("Equal", [x, y])], to=to) for x in node.input]
    share = b.op("Div", [gy, b.op("Sum", hits)])
    return [b.unbroadcast(b.op("Mul", [share, hit]), x, y) if need else None
            for x, hit, need in zip(node.input, hits, needs)]


def where(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = cond ? a : c: gy goes to a where cond holds, to c elsewhere; none to cond.

    Where over integer shape arithmetic (torch's Expand of a class token) carries none.
    """
    gy, y = gys[0], node.output[0]
    cond, a, c = node.input
    if gy is None or b.index.elem_type(y) not in FLOAT_TYPES:
        return [None, None, None]
    zero = b.const(np.zeros((), dtype=b.np_dtype(y)))
    ga = b.unbroadcast(b.op("Where", [cond, gy, zero]), a, y) if needs[1] else None
    gc = b.unbroadcast(b.op("Where", [cond, zero, gy]), c, y) if needs[2] else None
    return [None, ga, gc]


def mod(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Integer Mod (Swin's shape arithmetic) carries no gradient. Float Mod must have fmod=1:
    y = a − c · trunc(a/c), so ga = gy and gc = −gy · trunc(a/c) (away from the jumps)."""
    gy, y = gys[0], node.output[0]
    a, c = node.input
    if gy is None or b.index.elem_type(y) not in FLOAT_TYPES:
        return [None, None]
    ga = b.unbroadcast(gy, a, y) if needs[0] else None
    gc = None
    if needs[1]:
        ratio = b.op("Div", [a, c])
        trunc = b.op("Mul", [b.op("Sign", [ratio]), b.op("Floor", [b.op("Abs", [ratio])])])
        gc = b.unbroadcast(b.op("Neg", [b.op("Mul", [gy, trunc])]), c, y)
    return [ga, gc]
