"""The emitter that VJP rules write into, and the helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import CompileError
from service.graph.onnx_graph import GraphIndex, Shape

PREFIX = "xai/"

# ONNX Runtime's CPU provider runs convolutional layers in a blocked layout (NCHWc: channels
# in blocks of 8 with AVX2, 16 with AVX-512) and keeps a tensor in it only through ops with a
# blocked kernel: Conv (with a fused Relu, Clip, HardSigmoid), pools, Concat, Add/Sum, Relu,
# Sigmoid, Tanh, and Mul of two blocked tensors of one proven shape. Any other op (Greater,
# Cast, a Mul by a per-channel constant) gets its inputs reordered to NCHW and its output
# back: on DenseNet-121 that reordering cost more than the guided rule's own ops. Rules that
# can stay blocked do so for float32 4-D tensors whose channel count is a multiple of the
# largest block.
NCHWC_BLOCK = 16


class Node(NamedTuple):
    """One generated node, recorded as plain values: the protos are made by
    :meth:`VjpBuilder.node_protos`, when the graph is assembled."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    name: str
    attrs: dict[str, object]


class VjpBuilder:
    """Collects the nodes and constants of a gradient graph.

    Rules call :meth:`op` and :meth:`const`; the builder names every tensor it creates
    with the ``xai/`` prefix so generated names never collide with a model's own, and
    emits the opset-specific form of ops whose signature changed across opsets.

    It records them as plain values and makes their protos only when asked
    (:meth:`node_protos`, :meth:`initializer_protos`, :meth:`value_info`): every rule,
    and every CompileError a rule raises, runs in the recording, while making the protos
    (and copying the flipped kernels) was most of a guided graph's build on DenseNet-121,
    which a graph assembled at its first use (service.graph.build.RARELY_USED) does not
    pay at load.
    """

    def __init__(self, index: GraphIndex, *, guided: bool = False, prefix: str = PREFIX) -> None:
        if index.opset < 13:
            raise CompileError(
                f"gradient graphs need ONNX opset >= 13, the model uses opset {index.opset}; "
                "convert it with onnx.version_converter first"
            )
        self.index = index
        self.prefix = prefix
        self.opset = index.opset
        self.guided = guided
        self.nodes: list[Node] = []
        # Constants as given: a view into the model's weights (a flipped kernel) is copied
        # only when its proto is made; rules never change an array they gave.
        self.constants: list[tuple[str, np.ndarray]] = []
        self._count = 0
        self._produced: set[str] = set()
        self._like: dict[str, str] = {}
        self._channel_consts: dict[tuple[int, float], str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int = 1,
           hint: str | None = None, **attrs: object) -> str:
        """Emit one node with a single output and return the output's name."""
        return self.op_multi(op_type, inputs, outputs=outputs, hint=hint, **attrs)[0]

    def op_multi(self, op_type: str, inputs: Sequence[str], *, outputs: int,
                 hint: str | None = None, **attrs: object) -> list[str]:
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self._produced.update(names)
        self.nodes.append(Node(op_type, list(inputs), names, self.fresh(f"n_{op_type}"), attrs))
        return names

    def add(self, parts: Sequence[str], *, hint: str | None = None) -> str:
        """The sum of ``parts`` (two or more tensors of one shape).

        Two parts as Add, not Sum: ONNX Runtime's CPU Sum runs on one thread, its Add on
        the whole pool (a gradient's two parts on DenseNet-121 took 3-5× less time at 2
        threads); the value is the same single addition. More parts stay one Sum: a chain
        of Adds would read and write every partial sum again.
        """
        if len(parts) < 2:
            raise ValueError("add needs two or more parts")
        return self.op("Add" if len(parts) == 2 else "Sum", parts, hint=hint)

    def rename(self, tensor: str, name: str) -> None:
        """Make ``tensor`` available under ``name`` too (an Identity node), e.g. a graph
        output's fixed name."""
        self.nodes.append(Node("Identity", [tensor], [name], self.fresh("n_out"), {}))

    def node_protos(self) -> list[onnx.NodeProto]:
        return [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs)
                for n in self.nodes]

    def initializer_protos(self) -> list[onnx.TensorProto]:
        # from_array writes the bytes in C order, whatever the array's strides.
        return [numpy_helper.from_array(value, name) for name, value in self.constants]

    def shaped_like(self, name: str, like: str) -> None:
        """Record that generated tensor ``name`` has the type and shape of ``like``.

        A gradient has its tensor's shape, batch axis included. ONNX's shape inference
        loses the batch axis's name at the Shape-fed Reshapes and Expands of the rules (it
        becomes a fresh unknown per tensor), and without it ONNX Runtime cannot prove that a
        gradient and the forward tensor it is multiplied with have one shape, which its
        blocked layout needs (see NCHWC_BLOCK).
        """
        if name in self._produced and name not in self._like:
            self._like[name] = like

    def value_info(self) -> list[onnx.ValueInfoProto]:
        """The types recorded by :meth:`shaped_like`, where the tensor's type is known."""
        infos = []
        for name, like in self._like.items():
            elem, shape = self.index.elem_type(like), self.index.shape(like)
            if elem is not None and shape is not None:
                infos.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return infos

    def const(self, value: np.ndarray | float | Sequence[int], *, dtype: object = None,
              hint: str = "const") -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.constants.append((name, array))
        return name

    def float_const(self, value: np.ndarray | float, like: str) -> str:
        """A constant with the floating dtype of tensor ``like``."""
        return self.const(value, dtype=self.np_dtype(like))

    def np_dtype(self, name: str) -> np.dtype:
        elem = self.index.elem_type(name)
        if elem is None:
            return np.dtype(np.float32)
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))

    # Shapes -------------------------------------------------------------------------

    def shape(self, name: str) -> Shape | None:
        return self.index.shape(name)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape when every dimension is a known integer, else None."""
        shape = self.index.shape(name)
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        return tuple(int(d) for d in shape)  # type: ignore[arg-type]

    def rank(self, name: str) -> int:
        shape = self.index.shape(name)
        if shape is None:
            raise CompileError(f"the rank of tensor {name!r} is unknown after shape inference")
        return len(shape)

    def shape_of(self, name: str) -> str:
        """A tensor holding ``name``'s shape: a constant when static, else a Shape node."""
        static = self.static_shape(name)
        if static is not None:
            return self.const(np.array(static, dtype=np.int64), hint="shape")
        return self.op("Shape", [name])

    # Opset-dependent forms ------------------------------------------------------------

    def reduce(self, op_type: str, x: str, axes: Sequence[int], *, keepdims: bool) -> str:
        # ReduceSum took axes as an input from opset 13, the other reductions from 18.
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.const(np.array(list(axes), dtype=np.int64))],
                           keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(np.array(list(axes), dtype=np.int64))])

    def reshape_like(self, g: str, like: str) -> str:
        return self.op("Reshape", [g, self.shape_of(like)])

    def _unbroadcast_at_run_time(self, g: str, x: str, lead: int, axes: list[int],
                                 undecided: list[int], sx: object, sy: object) -> str:
        """ReduceSum over ``axes`` and over each undecided axis where x's size is 1 when the
        graph runs: summing where x has size 1 is right whatever y's size, so that test
        alone decides, as NumPy's broadcasting does. Exporters leave such sizes symbolic
        (a ViT's class token concatenated to a batch of patch tokens)."""
        if self.opset < 13:
            raise CompileError(
                f"cannot tell whether input {x!r} is broadcast along axes {undecided}: shapes "
                f"{sx} and {sy} are not static there (deciding it at run time needs opset 13)")
        sizes = self.op("Gather", [self.op("Shape", [x]),
                                   self.const(np.array(undecided, dtype=np.int64))])
        ones = self.op("Equal", [sizes, self.const(np.array(1, dtype=np.int64))])
        chosen = self.op("Compress", [self.const(np.array([lead + i for i in undecided],
                                                          dtype=np.int64)), ones], axis=0)
        every = self.op("Concat", [self.const(np.array(axes, dtype=np.int64)), chosen], axis=0)
        return self.op("ReduceSum", [g, every], keepdims=1, noop_with_empty_axes=1)

    def blocked_channels(self, x: str) -> int | None:
        """x's channel count when ONNX Runtime can keep x in its blocked layout (a float32
        4-D tensor, channels a multiple of NCHWC_BLOCK), else None."""
        shape = self.shape(x)
        if (self.index.elem_type(x) != onnx.TensorProto.FLOAT or shape is None
                or len(shape) != 4 or not isinstance(shape[1], int)
                or shape[1] % NCHWC_BLOCK):
            return None
        return shape[1]

    def mask_positive(self, x: str) -> str:
        """1.0 where x > 0 else 0.0, as a float tensor.

        Mul by Cast(Greater) is measurably cheaper in ONNX Runtime than Where. A tensor that
        can stay in ONNX Runtime's blocked layout (:meth:`blocked_channels`) gets the same
        values from ops with blocked kernels: a 1×1 depthwise Conv by 2^127, then a
        HardSigmoid of slope 2^127 and offset 0 (clip(2^127 · v, 0, 1)), which ONNX Runtime
        fuses into the Conv. Exact: each product by a power of two is exact (or +inf), so
        every positive float32, down to the smallest subnormal 2^-149, reaches at least
        2^105 before the clip and gives 1; x ≤ 0 gives 0.
        """
        channels = self.blocked_channels(x)
        if channels is None:
            zero = self.float_const(0.0, x)
            return self.op("Cast", [self.op("Greater", [x, zero])],
                           to=self.index.elem_type(x) or 1)
        scale = self._channel_const(channels, 2.0 ** 127)
        conv = self.op("Conv", [x, scale], group=channels)
        return self.op("HardSigmoid", [conv], alpha=2.0 ** 127, beta=0.0)

    def _channel_const(self, channels: int, value: float) -> str:
        """Depthwise 1×1 weights of one value, shared by every rule that needs them."""
        key = (channels, value)
        if key not in self._channel_consts:
            self._channel_consts[key] = self.const(np.full((channels, 1, 1, 1), value,
                                                           dtype=np.float32), hint="scale")
        return self._channel_consts[key]

    def scale_channels(self, g: str, factor: np.ndarray, like: str) -> str:
        """g · factor along axis 1 (one value per channel), g shaped like ``like``.

        A Mul by a per-channel constant, or where ``like`` can stay in ONNX Runtime's
        blocked layout a 1×1 depthwise Conv by it (the same single product per element).
        """
        channels = self.blocked_channels(like)
        if channels is None or factor.size != channels:
            shape = (1, -1) + (1,) * (self.rank(like) - 2)
            return self.op("Mul", [g, self.float_const(factor.reshape(shape), like)], hint="grad")
        weights = self.const(factor.reshape(channels, 1, 1, 1), dtype=np.float32)
        return self.op("Conv", [g, weights], group=channels, hint="grad")

    def unbroadcast(self, g: str, x: str, y: str, *, core: int = 0) -> str:
        """Sum ``g`` (broadcast like output ``y``) back to the shape of input ``x``.

        Summing over an axis where x has size 1 is right even when y's size there is also 1,
        so only x's static ones and y's extra leading axes decide the axes. The last
        ``core`` axes are not broadcast (MatMul's matrix axes) and are left alone.
        """
        sx, sy = self.shape(x), self.shape(y)
        if sx is None or sy is None:
            raise CompileError(f"cannot reduce a broadcast gradient: unknown shape of {x!r}")
        lead = len(sy) - len(sx)
        if lead < 0:
            raise CompileError(f"input {x!r} has a higher rank than output {y!r}")
        axes = list(range(lead))
        undecided: list[int] = []
        for i, dx in enumerate(sx[: len(sx) - core]):
            dy = sy[lead + i]
            if dx == dy:
                continue
            if dx == 1:
                axes.append(lead + i)
            elif dx is None or dy is None or isinstance(dx, str):
                undecided.append(i)
        if undecided:
            summed = self._unbroadcast_at_run_time(g, x, lead, axes, undecided, sx, sy)
        elif not axes:
            return g
        else:
            summed = self.reduce("ReduceSum", g, axes, keepdims=True)
        if lead == 0:
            return summed
        return self.reshape_like(summed, x)
