"""VJP rule for BatchNormalization in inference mode."""

from __future__ import annotations

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def batch_normalization(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                        needs: list[bool]) -> Grads:
    """y = scale * (x - mean) / sqrt(var + eps) + bias, statistics fixed: a per-channel affine."""
    if int(attr(node, "training_mode", 0)):  # type: ignore[arg-type]
        raise CompileError(f"BatchNormalization node {node.name!r} is in training mode")
    x, gy = node.input[0], gys[0]
    assert gy is not None
    if any(needs[1:]):
        raise CompileError(
            f"BatchNormalization node {node.name!r}: gradients of its parameters are not supported"
        )
    eps = float(attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    rank = b.rank(x)
    scale, var = b.index.constant(node.input[1]), b.index.constant(node.input[4])
    if scale is not None and var is not None:
        factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        shape = (1, -1) + (1,) * (rank - 2)
        coeff = b.float_const(factor.reshape(shape), x)
    else:
        denom = b.op("Sqrt", [b.op("Add", [node.input[4], b.float_const(eps, x)])])
        per_channel = b.op("Div", [node.input[1], denom])
        coeff = b.unsqueeze(per_channel, [0, *range(2, rank)])
    return [b.op("Mul", [gy, coeff], hint="grad")] + [None] * (len(node.input) - 1)
