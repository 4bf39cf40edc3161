"""VJP rules for Gemm and MatMul."""

from __future__ import annotations

import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def gemm(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Y = alpha * op(A) @ op(B) + beta * C, op = optional transpose."""
    gy = gys[0]
    assert gy is not None
    a, w = node.input[0], node.input[1]
    alpha = float(attr(node, "alpha", 1.0))  # type: ignore[arg-type]
    beta = float(attr(node, "beta", 1.0))  # type: ignore[arg-type]
    ta = int(attr(node, "transA", 0))  # type: ignore[arg-type]
    tb = int(attr(node, "transB", 0))  # type: ignore[arg-type]
    ga = gb = gc = None
    if needs[0]:
        # d op(A) = alpha * gy @ op(B)^T; transposed back when transA is set.
        if ta:
            ga = b.op("Gemm", [w, gy], alpha=alpha, transA=tb, transB=1, hint="grad")
        else:
            ga = b.op("Gemm", [gy, w], alpha=alpha, transB=1 - tb, hint="grad")
    if len(needs) > 1 and needs[1]:
        if tb:
            gb = b.op("Gemm", [gy, a], alpha=alpha, transA=1, transB=ta, hint="grad")
        else:
            gb = b.op("Gemm", [a, gy], alpha=alpha, transA=1 - ta, hint="grad")
    if len(needs) > 2 and needs[2]:
        scaled = b.op("Mul", [gy, b.float_const(beta, node.output[0])]) if beta != 1.0 else gy
        gc = b.unbroadcast(scaled, node.input[2], node.output[0])
    return [ga, gb, gc][: len(node.input)]


def matmul(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Batched matrix product with NumPy broadcasting over the leading axes."""
    gy, y = gys[0], node.output[0]
    assert gy is not None
    a, w = node.input
    ra, rw = b.rank(a), b.rank(w)
    if ra < 2 or rw < 2:
        raise CompileError(
            f"MatMul node {node.name!r}: gradients of 1-D MatMul operands are not supported"
        )

    def swap_last(name: str, rank: int) -> str:
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        return b.op("Transpose", [name], perm=perm)

    ga = gw = None
    if needs[0]:
        ga = b.unbroadcast(b.op("MatMul", [gy, swap_last(w, rw)]), a, y, core=2)
    if needs[1]:
        gw = b.unbroadcast(b.op("MatMul", [swap_last(a, ra), gy]), w, y, core=2)
    return [ga, gw]
