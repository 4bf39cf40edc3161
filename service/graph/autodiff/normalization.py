"""VJP rules for BatchNormalization in inference mode and LayerNormalization."""

from __future__ import annotations

import numpy as np
import onnx

from service.errors import CompileError
from service.graph.autodiff.builder import VjpBuilder
from service.graph.autodiff.reduce import reduced_count
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
    scale, var = b.index.constant(node.input[1]), b.index.constant(node.input[4])
    if scale is not None and var is not None:
        factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
        gx = b.scale_channels(gy, factor, x)
    else:
        denom = b.op("Sqrt", [b.op("Add", [node.input[4], b.float_const(eps, x)])])
        per_channel = b.op("Div", [node.input[1], denom])
        coeff = b.unsqueeze(per_channel, [0, *range(2, b.rank(x))])
        gx = b.op("Mul", [gy, coeff], hint="grad")
    return [gx] + [None] * (len(node.input) - 1)


def layer_normalization(b: VjpBuilder, node: onnx.NodeProto, gys: Grads,
                        needs: list[bool]) -> Grads:
    """Y = x̂ · Scale + B, x̂ = (X − μ) · r, r = 1/√(σ² + ε), μ and σ² over axes axis..rank−1.

    With g = gY · Scale: gX = r · (g − mean(g) − x̂ · mean(g · x̂)), gScale and gB are gY · x̂
    and gY summed to their (broadcast) shapes. μ and r are recomputed from X (Mean and
    InvStdDev are optional outputs); gradients reaching those outputs are exact too:
    ∂μ/∂X = 1/n and ∂r/∂X = −r³ (X − μ)/n. stash_type only sets the precision of the
    statistics, which is the input's for float32 and float64.
    """
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y = node.output[0]
    rank = b.rank(x)
    axis = int(attr(node, "axis", -1)) % rank  # type: ignore[arg-type]
    axes = list(range(axis, rank))
    eps = float(attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    gy = gys[0]
    to = b.index.elem_type(x) or onnx.TensorProto.FLOAT

    def stat_grad(position: int) -> str | None:
        # Mean and InvStdDev have the stash type (float32 for a float64 X, by default).
        g = gys[position] if len(gys) > position else None
        if g is None or b.index.elem_type(node.output[position]) in (None, to):
            return g
        return b.op("Cast", [g], to=to)

    g_mean, g_inv = stat_grad(1), stat_grad(2)

    def mean(t: str) -> str:
        return b.reduce("ReduceMean", t, axes, keepdims=True)

    centred = b.op("Sub", [x, mean(x)])
    var = mean(b.op("Mul", [centred, centred]))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.float_const(eps, x)])])])
    xhat = b.op("Mul", [centred, inv]) if gy is not None else None
    gx = gs = gb = None
    if needs[0]:
        parts: list[str] = []
        if gy is not None:
            assert xhat is not None
            g = b.op("Mul", [gy, scale])
            spread = b.op("Sub", [b.op("Sub", [g, mean(g)]),
                                  b.op("Mul", [xhat, mean(b.op("Mul", [g, xhat]))])])
            parts.append(b.op("Mul", [inv, spread]))
        if g_inv is not None:
            cube = b.op("Mul", [inv, b.op("Mul", [inv, inv])])
            coeff = b.op("Div", [b.op("Neg", [b.op("Mul", [g_inv, cube])]),
                                 reduced_count(b, x, axes)])
            parts.append(b.op("Mul", [coeff, centred]))
        if g_mean is not None:
            share = b.op("Div", [g_mean, reduced_count(b, x, axes)])
            parts.append(b.op("Expand", [share, b.shape_of(x)]) if not parts else share)
        gx = parts[0]
        for part in parts[1:]:
            gx = b.op("Add", [gx, part], hint="grad")
    if gy is not None and len(needs) > 1 and needs[1]:
        assert xhat is not None
        gs = b.unbroadcast(b.op("Mul", [gy, xhat]), scale, y)
    if gy is not None and bias is not None and needs[2]:
        gb = b.unbroadcast(gy, bias, y)
    return [gx, gs, gb][: len(node.input)]
