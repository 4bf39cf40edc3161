"""The one place where ONNX op types meet their VJP rules."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from service.graph.autodiff import (
    activations,
    constants,
    conv,
    elementwise,
    linear,
    normalization,
    pointwise,
    pooling,
    reduce,
    resize,
    shape,
)
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
    "PRelu": activations.prelu,
    "Clip": activations.clip,
    "HardSigmoid": activations.hard_sigmoid,
    "HardSwish": activations.hard_swish,
    # constants.py
    "Cast": constants.cast,
    "CastLike": constants.cast,
    "Gather": constants.gather,
    "Shape": constants.no_gradient,
    "Size": constants.no_gradient,
    "Constant": constants.no_gradient,
    "ConstantOfShape": constants.no_gradient,
    "Range": constants.no_gradient,
    "NonZero": constants.no_gradient,
    "EyeLike": constants.no_gradient,
    "Equal": constants.no_gradient,
    "Less": constants.no_gradient,
    "Greater": constants.no_gradient,
    "LessOrEqual": constants.no_gradient,
    "GreaterOrEqual": constants.no_gradient,
    "Not": constants.no_gradient,
    "And": constants.no_gradient,
    "Or": constants.no_gradient,
    "Xor": constants.no_gradient,
    "IsNaN": constants.no_gradient,
    "IsInf": constants.no_gradient,
    "ArgMax": constants.no_gradient,
    "ArgMin": constants.no_gradient,
    "Floor": constants.no_gradient,
    "Ceil": constants.no_gradient,
    "Round": constants.no_gradient,
    "Sign": constants.no_gradient,
    # conv.py
    "Conv": conv.conv,
    # elementwise.py
    "Add": elementwise.add,
    "Sub": elementwise.sub,
    "Mul": elementwise.mul,
    "Div": elementwise.div,
    "Neg": elementwise.neg,
    "Pow": elementwise.pow_,
    "Sum": elementwise.add,
    "Mean": elementwise.mean,
    "Max": elementwise.extremum,
    "Min": elementwise.extremum,
    "Where": elementwise.where,
    "Mod": elementwise.mod,
    # linear.py
    "Gemm": linear.gemm,
    "MatMul": linear.matmul,
    # normalization.py
    "BatchNormalization": normalization.batch_normalization,
    "LayerNormalization": normalization.layer_normalization,
    # pointwise.py
    "Sqrt": pointwise.sqrt,
    "Reciprocal": pointwise.reciprocal,
    "Exp": pointwise.exp,
    "Log": pointwise.log,
    "Abs": pointwise.abs_,
    "Erf": pointwise.erf,
    "Gelu": pointwise.gelu,
    # pooling.py
    "MaxPool": pooling.max_pool,
    "AveragePool": pooling.average_pool,
    # reduce.py
    "GlobalAveragePool": reduce.global_average_pool,
    "GlobalMaxPool": reduce.global_max_pool,
    "ReduceMean": reduce.reduce_mean,
    "ReduceSum": reduce.reduce_sum,
    "ReduceSumSquare": reduce.reduce_sum_square,
    "ReduceL2": reduce.reduce_l2,
    "ReduceL1": reduce.reduce_l1,
    "ReduceLogSumExp": reduce.reduce_log_sum_exp,
    "ReduceMax": reduce.reduce_extremum,
    "ReduceMin": reduce.reduce_extremum,
    # resize.py
    "Resize": resize.resize,
    # shape.py
    "Identity": shape.identity,
    "Dropout": shape.identity,
    "Flatten": shape.reshape,
    "Reshape": shape.reshape,
    "Squeeze": shape.reshape,
    "Unsqueeze": shape.reshape,
    "Transpose": shape.transpose,
    "Expand": shape.expand,
    "Tile": shape.tile,
    "Concat": shape.concat,
    "Split": shape.split,
    "Slice": shape.slice_,
    "Pad": shape.pad,
}

__all__ = ["RULES", "Rule"]
