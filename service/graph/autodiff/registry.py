"""The one place where ONNX op types meet their VJP rules."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from service.graph.autodiff import activations, elementwise, linear, normalization, reduce, shape
from service.graph.autodiff.builder import VjpBuilder

Rule = Callable[[VjpBuilder, onnx.NodeProto, list[str | None], list[bool]], list[str | None]]

RULES: dict[str, Rule] = {
    # activations.py
    "Relu": activations.relu,
    "LeakyRelu": activations.leaky_relu,
    "Sigmoid": activations.sigmoid,
    "Tanh": activations.tanh,
    "Softmax": activations.softmax,
    "LogSoftmax": activations.log_softmax,
    # elementwise.py
    "Add": elementwise.add,
    "Sub": elementwise.sub,
    "Mul": elementwise.mul,
    "Div": elementwise.div,
    "Neg": elementwise.neg,
    # linear.py
    "Gemm": linear.gemm,
    "MatMul": linear.matmul,
    # normalization.py
    "BatchNormalization": normalization.batch_normalization,
    # reduce.py
    "GlobalAveragePool": reduce.global_average_pool,
    "GlobalMaxPool": reduce.global_max_pool,
    "ReduceMean": reduce.reduce_mean,
    "ReduceSum": reduce.reduce_sum,
    # shape.py
    "Identity": shape.identity,
    "Dropout": shape.identity,
    "Flatten": shape.reshape,
    "Reshape": shape.reshape,
    "Squeeze": shape.reshape,
    "Unsqueeze": shape.reshape,
    "Transpose": shape.transpose,
}

__all__ = ["RULES", "Rule"]
