"""VJP rules for smooth unary functions: Sqrt, Reciprocal, Exp, Log, Abs, Erf and Gelu.

Exporters write these where a framework op has no ONNX counterpart of its own: GELU as
``x · (1 + Erf(x / √2)) / 2`` (torch legacy export), a LayerNorm decomposed into ReduceMean,
Sub, Pow, Sqrt and Div, and scale factors computed at run time. Each derivative is written
with the forward tensor that makes it cheapest (the output where the derivative is a
function of it, as for Exp and Sqrt).
"""

from __future__ import annotations

import math

import onnx

from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def sqrt(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = √x: gx = gy / (2y) (infinite at x = 0, as the derivative is)."""
    y, gy = node.output[0], gys[0]
    assert gy is not None
    return [b.op("Div", [b.op("Mul", [gy, b.float_const(0.5, y)]), y], hint="grad")]


def reciprocal(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = 1/x: gx = −gy · y²."""
    y, gy = node.output[0], gys[0]
    assert gy is not None
    return [b.op("Neg", [b.op("Mul", [gy, b.op("Mul", [y, y])])], hint="grad")]


def exp(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = eˣ: gx = gy · y."""
    assert gys[0] is not None
    return [b.op("Mul", [gys[0], node.output[0]], hint="grad")]


def log(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = ln x: gx = gy / x."""
    assert gys[0] is not None
    return [b.op("Div", [gys[0], node.input[0]], hint="grad")]


def abs_(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = |x|: gx = gy · sign(x), 0 at x = 0 (the subgradient torch and TF use)."""
    assert gys[0] is not None
    return [b.op("Mul", [gys[0], b.op("Sign", [node.input[0]])], hint="grad")]


def erf(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """y = erf(x): gx = gy · 2/√π · exp(−x²)."""
    x, gy = node.input[0], gys[0]
    assert gy is not None
    bell = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    return [b.op("Mul", [gy, b.op("Mul", [bell, b.float_const(2.0 / math.sqrt(math.pi), x)])],
                 hint="grad")]


def gelu(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Gelu (opset 20), y = x · Φ(x). Not a rectifier: guided backprop keeps its derivative.

    approximate="none": y' = Φ(x) + x · φ(x), Φ(x) = (1 + erf(x/√2))/2, φ(x) = e^(−x²/2)/√(2π).
    approximate="tanh": y = x (1 + t)/2 with t = tanh(u), u = √(2/π) (x + 0.044715 x³):
    y' = (1 + t)/2 + x (1 − t²) u'/2, u' = √(2/π) (1 + 3 · 0.044715 x²).
    """
    x, gy = node.input[0], gys[0]
    assert gy is not None
    square = b.op("Mul", [x, x])
    one, half = b.float_const(1.0, x), b.float_const(0.5, x)
    if str(attr(node, "approximate", "none")) == "tanh":
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        u = b.op("Mul", [x, b.op("Add", [b.float_const(k, x),
                                          b.op("Mul", [square, b.float_const(k * c, x)])])])
        t = b.op("Tanh", [u])
        du = b.op("Add", [b.float_const(k, x), b.op("Mul", [square, b.float_const(3 * k * c, x)])])
        cdf = b.op("Mul", [b.op("Add", [one, t]), half])
        slope = b.op("Mul", [b.op("Mul", [x, half]),
                             b.op("Mul", [b.op("Sub", [one, b.op("Mul", [t, t])]), du])])
    else:
        erf_ = b.op("Erf", [b.op("Mul", [x, b.float_const(math.sqrt(0.5), x)])])
        cdf = b.op("Mul", [b.op("Add", [one, erf_]), half])
        pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [square, b.float_const(-0.5, x)])]),
                           b.float_const(1.0 / math.sqrt(2.0 * math.pi), x)])
        slope = b.op("Mul", [x, pdf])
    return [b.op("Mul", [gy, b.op("Add", [cdf, slope])], hint="grad")]
