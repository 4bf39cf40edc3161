"""Small classifiers built node by node, each with an independent NumPy version of its head.

Backbone: Conv 3×3 (pad 1) → Relu → [target layer, (N, 6, 5, 4)]. Heads differ; every head
also exists as plain NumPy (``numpy_head``) so tests can check the ONNX machinery against
code that shares nothing with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

C, H, W = 6, 5, 4
K = 3
TARGET = "features"


@dataclass
class Handmade:
    name: str
    model: onnx.ModelProto
    numpy_head: Callable[[np.ndarray], np.ndarray]  # (B, C, H, W) float64 → (B, K) logits
    activation: str  # what the graph applies to the logits
    layout: str = "NCHW"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out_dim: int,
           dtype: int, in_shape: list[object], opset: int,
           domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("image", dtype, in_shape)],
        [helper.make_tensor_value_info("scores", dtype, ["N", out_dim])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    # Shape inference knows no other domain's ops.
    onnx.checker.check_model(model, full_check=not domains)
    return model


def build(name: str, dtype: type = np.float32, opset: int = 17, seed: int = 0) -> Handmade:
    """One of ``NAMES``, with float32 or float64 weights."""
    rng = np.random.default_rng(seed)
    tp = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT

    def w(*shape: int, scale: float = 0.5) -> np.ndarray:
        return (rng.normal(size=shape) * scale).astype(dtype)

    inits: dict[str, np.ndarray] = {"conv_w": w(C, 2, 3, 3), "conv_b": w(C, scale=0.1)}
    backbone = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], [TARGET]),
    ]
    in_shape: list[object] = ["N", 2, H, W]

    if name == "linear":
        # GAP → Flatten → Gemm: the head the seed project's CRM assumed.
        inits |= {"fc_w": w(K, C), "fc_b": w(K)}
        head = [
            helper.make_node("GlobalAveragePool", [TARGET], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1),
        ]
        fc_w, fc_b = inits["fc_w"], inits["fc_b"]

        def numpy_head(a: np.ndarray) -> np.ndarray:
            return a.mean(axis=(2, 3)) @ fc_w.T.astype(np.float64) + fc_b

        return Handmade(name, _model(backbone + head, inits, K, tp, in_shape, opset),
                        numpy_head, "none")

    if name == "mlp":
        # GAP → Dense → ReLU → Dropout → Dense → Sigmoid: the demo model's head shape.
        inits |= {"w1": w(8, C, scale=1.0), "b1": w(8), "w2": w(K, 8), "b2": w(K)}
        head = [
            helper.make_node("GlobalAveragePool", [TARGET], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Dropout", ["hr"], ["hd"]),
            helper.make_node("Gemm", ["hd", "w2", "b2"], ["logits"], transB=1),
            helper.make_node("Sigmoid", ["logits"], ["scores"]),
        ]
        v = {k: inits[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2")}

        def numpy_head(a: np.ndarray) -> np.ndarray:
            hidden = np.maximum(a.mean(axis=(2, 3)) @ v["w1"].T + v["b1"], 0)
            return hidden @ v["w2"].T + v["b2"]

        return Handmade(name, _model(backbone + head, inits, K, tp, in_shape, opset),
                        numpy_head, "sigmoid")

    if name == "bn_softmax":
        # BN → Relu → ReduceMean(keepdims=0) → MatMul → Add → Mul(scale) → Softmax.
        inits |= {
            "bn_s": w(C, scale=1.0), "bn_b": w(C), "bn_m": w(C), "bn_v": (rng.uniform(0.5, 2, C)
                                                                           ).astype(dtype),
            "mm_w": w(C, K), "mm_b": w(K), "temp": np.array([1.5], dtype=dtype),
            "axes": np.array([2, 3], dtype=np.int64),
        }
        head = [
            helper.make_node("BatchNormalization", [TARGET, "bn_s", "bn_b", "bn_m", "bn_v"],
                             ["bn"], epsilon=1e-3),
            helper.make_node("Relu", ["bn"], ["bnr"]),
            helper.make_node("ReduceMean", ["bnr", "axes"] if opset >= 18 else ["bnr"],
                             ["pooled"], keepdims=0, **({} if opset >= 18 else {"axes": [2, 3]})),
            helper.make_node("MatMul", ["pooled", "mm_w"], ["mm"]),
            helper.make_node("Add", ["mm", "mm_b"], ["biased"]),
            helper.make_node("Mul", ["biased", "temp"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
        ]
        v = {k: inits[k].astype(np.float64) for k in inits if k != "axes"}

        def numpy_head(a: np.ndarray) -> np.ndarray:
            shape = (1, C, 1, 1)
            bn = (v["bn_s"].reshape(shape) * (a - v["bn_m"].reshape(shape))
                  / np.sqrt(v["bn_v"].reshape(shape) + 1e-3) + v["bn_b"].reshape(shape))
            pooled = np.maximum(bn, 0).mean(axis=(2, 3))
            return (pooled @ v["mm_w"] + v["mm_b"]) * v["temp"]

        return Handmade(name, _model(backbone + head, inits, K, tp, in_shape, opset),
                        numpy_head, "softmax")

    if name == "nhwc":
        # tf2onnx-style: NHWC image, Transposes around the conv, ReduceMean over axes 1, 2.
        inits |= {"fc_w": w(C, 8, scale=1.0), "fc_b": w(8), "out_w": w(8, K), "out_b": w(K)}
        backbone = [
            helper.make_node("Transpose", ["image"], ["image_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["image_nchw", "conv_w", "conv_b"], ["conv"],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("Transpose", ["relu"], [TARGET], perm=[0, 2, 3, 1]),
        ]
        head = [
            helper.make_node("ReduceMean", [TARGET], ["gap"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["gap", "fc_w"], ["h"]),
            helper.make_node("Add", ["h", "fc_b"], ["hb"]),
            helper.make_node("Tanh", ["hb"], ["ht"]),
            helper.make_node("MatMul", ["ht", "out_w"], ["o"]),
            helper.make_node("Add", ["o", "out_b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["scores"]),
        ]
        v = {k: inits[k].astype(np.float64) for k in ("fc_w", "fc_b", "out_w", "out_b")}

        def numpy_head(a: np.ndarray) -> np.ndarray:  # a is channel-first here too
            hidden = np.tanh(a.mean(axis=(2, 3)) @ v["fc_w"] + v["fc_b"])
            return hidden @ v["out_w"] + v["out_b"]

        return Handmade(name, _model(backbone + head, inits, K, tp, ["N", H, W, 2], 17),
                        numpy_head, "sigmoid", layout="NHWC")

    if name == "contrib_head":
        # An RGB image and, in the head, an op ONNX Runtime runs but no gradient rule covers
        # (a com.microsoft contrib op, as in models saved after ORT's graph optimisation):
        # GAP → Dense → com.microsoft:Gelu → Dense → Sigmoid. Not in NAMES: no head VJP.
        inits |= {"conv_w": w(C, 3, 3, 3), "w1": w(8, C, scale=1.0), "b1": w(8),
                  "w2": w(K, 8), "b2": w(K)}
        head = [
            helper.make_node("GlobalAveragePool", [TARGET], ["gap"]),
            helper.make_node("Flatten", ["gap"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], transB=1),
            helper.make_node("Gelu", ["h"], ["hg"], domain="com.microsoft", name="fused_gelu"),
            helper.make_node("Gemm", ["hg", "w2", "b2"], ["logits"], transB=1),
            helper.make_node("Sigmoid", ["logits"], ["scores"]),
        ]
        v = {k: inits[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2")}
        erf = np.vectorize(math.erf)

        def numpy_head(a: np.ndarray) -> np.ndarray:
            hidden = a.mean(axis=(2, 3)) @ v["w1"].T + v["b1"]
            return (0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))) @ v["w2"].T + v["b2"]

        model = _model(backbone + head, inits, K, tp, ["N", 3, H, W], opset,
                       domains=("com.microsoft",))
        # What ORT writes when it saves an optimised model, and shape inference needs here.
        model.graph.value_info.append(helper.make_tensor_value_info("hg", tp, ["N", 8]))
        return Handmade(name, model, numpy_head, "sigmoid")

    raise KeyError(name)


NAMES = ("linear", "mlp", "bn_softmax", "nhwc")
