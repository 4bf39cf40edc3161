"""The emitter that VJP rules write into, and the helpers they share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import CompileError
from service.graph.onnx_graph import GraphIndex, Shape

PREFIX = "xai/"


class VjpBuilder:
    """Collects the nodes and constants of a gradient graph.

    Rules call :meth:`op` and :meth:`const`; the builder names every tensor it creates
    with the ``xai/`` prefix so generated names never collide with a model's own, and
    emits the opset-specific form of ops whose signature changed across opsets.
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
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

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
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n_{op_type}"),
                             **attrs)
        )
        return names

    def const(self, value: np.ndarray | float | int | Sequence[int], *, dtype: object = None,
              hint: str = "const") -> str:
        array = np.asarray(value, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
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

    def mask_positive(self, x: str) -> str:
        """1.0 where x > 0 else 0.0, as a float tensor.

        Mul by Cast(Greater) is measurably cheaper in ONNX Runtime than Where.
        """
        zero = self.float_const(0.0, x)
        return self.op("Cast", [self.op("Greater", [x, zero])], to=self.index.elem_type(x) or 1)

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
