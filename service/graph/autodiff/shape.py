"""VJP rules for ops that only move values around: Identity, Dropout, reshapes, Transpose."""

from __future__ import annotations

import numpy as np
import onnx

from service.graph.autodiff.builder import VjpBuilder
from service.graph.onnx_graph import attr

Grads = list[str | None]


def _only_first(grad: str, node: onnx.NodeProto) -> Grads:
    return [grad] + [None] * (len(node.input) - 1)


def identity(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    # Dropout is the identity at inference; its optional mask output carries no gradient.
    assert gys[0] is not None
    return _only_first(gys[0], node)


def reshape(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    """Flatten, Reshape, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    assert gys[0] is not None
    return _only_first(b.reshape_like(gys[0], node.input[0]), node)


def transpose(b: VjpBuilder, node: onnx.NodeProto, gys: Grads, needs: list[bool]) -> Grads:
    assert gys[0] is not None
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(b.rank(node.input[0]))))
    inverse = np.argsort(np.asarray(perm)).tolist()
    return [b.op("Transpose", [gys[0]], perm=inverse, hint="grad")]
