"""VJP rules for broadcasting arithmetic: Add, Sub, Mul, Div, Neg."""

from __future__ import annotations

import onnx

from service.graph.autodiff.builder import VjpBuilder

Grads = list[str | None]


def add(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
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
