"""CNN Fixations: hand-worked graphs, a per-point reference walker on the zoo, the heatmap
post-processing, and the method over HTTP.

The reference walker below reads the ONNX nodes itself (attributes, initializers, shapes of
real activations) and moves one point at a time with plain loops and explicit bounds
checks; it shares nothing with ``service.graph.fixations`` or the vectorised walk.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import CompileError
from service.graph.build import Capability, compile_model
from service.graph.fixations import FixationPlan, build_plan, expose, plan_from_graph
from service.graph.target import Split
from service.methods import METHODS, Target, rows
from service.methods.fixations import density, image_points, inliers, walk
from service.models.activation import Activation
from service.models.spec import Layout
from service.runtime.engine import Engine
from service.runtime.sessions import make_session

ZOO = Path(__file__).resolve().parent.parent / "data" / "zoo"
MANIFEST: dict[str, dict[str, object]] = json.loads((ZOO / "manifest.json").read_text())
NAMES = list(MANIFEST)


# --- (a) graphs small enough to work out by hand ---------------------------------------

def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
           image: list[int], logits: list[int], opset: int = 17,
           ints: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The float initializers ``inits`` and int64 ones ``ints``."""
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits)],
        initializer=[*(numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                       for k, v in inits.items()),
                     *(numpy_helper.from_array(np.asarray(v, dtype=np.int64), k)
                       for k, v in (ints or {}).items())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _trace(model: onnx.ModelProto, x: np.ndarray,
           classes: list[int]) -> tuple[FixationPlan, dict[str, np.ndarray]]:
    split = Split("image", "logits", "logits", "none", "image", Layout.NCHW, (1, 1, 1))
    plan = build_plan(model, split, Layout.NCHW)
    exposed = expose(model, plan, split.target)
    session = make_session(exposed, ["CPUExecutionProvider"], 1)
    names = [n for n in plan.needed if n != "image"]
    acts = dict(zip(names, session.run(names, {"image": x}))) | {"image": x}
    return plan, walk(plan, acts, classes, trace=True)


def _points(traced: dict[str, np.ndarray], name: str, tag: int) -> set[tuple[int, ...]]:
    rows = traced.get(name, np.zeros((0, 1), dtype=np.int64))
    return {tuple(int(v) for v in r[1:]) for r in rows if r[0] == tag}


def test_conv_maxpool_flatten_fc_follows_the_strongest_pooled_input() -> None:
    # Identity 3×3 conv (centre weight 1, pad 1) → ReLU → 2×2 max pool → Flatten → Gemm.
    x = np.array([[1, 2, 0, 0],
                  [0, 9, 3, 0],
                  [0, 0, 0, 4],
                  [7, 0, 0, 1]], dtype=np.float32).reshape(1, 1, 4, 4)
    centre = np.zeros((1, 1, 3, 3))
    centre[0, 0, 1, 1] = 1
    model = _graph([
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ], {"w": centre, "fc": [[1, 0, 0, 5], [0, -1, 2, 0]]}, [1, 1, 4, 4], [1, 2])
    plan, traced = _trace(model, x, [0, 1])
    assert plan.steps[0].attrs["spatial"], "Gemm over a flattened 2×2 map: the argmax rule"
    # pooled = [9, 3, 7, 4]; class 0: 9·1 < 4·5 → bottom-right window, max 4 at (2, 3).
    assert _points(traced, "pool", 0) == {(0, 0, 1, 1)}
    assert _points(traced, "image", 0) == {(0, 0, 2, 3)}
    # class 1: 3·−1 < 7·2 → bottom-left window, max 7 at (3, 0).
    assert _points(traced, "image", 1) == {(0, 0, 3, 0)}


def test_vector_fc_keeps_every_positive_contribution() -> None:
    # A 1×1 "image" of 4 channels is a vector: Flatten → Gemm → ReLU → Gemm.
    x = np.array([1, -2, 3, 0.5], dtype=np.float32).reshape(1, 4, 1, 1)
    w1 = [[1, 1, 1, 1], [-1, -1, 0, 2], [0, 1, -1, 0]]
    model = _graph([
        helper.make_node("Flatten", ["image"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2"], ["logits"]),  # transB=0: w2 is (in, out)
    ], {"w1": w1, "w2": np.array([[1, -1, 5], [1, 1, 0]]).T}, [1, 4, 1, 1], [1, 2])
    plan, traced = _trace(model, x, [0, 1])
    assert not any(s.attrs.get("spatial") for s in plan.steps if s.rule == "fc")
    # hidden = relu([2.5, 2, -5]) = [2.5, 2, 0]
    assert _points(traced, "hr", 0) == {(0, 0)}  # [2.5, −2, 0·5]: only the first is > 0
    assert _points(traced, "hr", 1) == {(0, 0), (0, 1)}
    # row 0 · x = [1, −2, 3, .5] → {0, 2, 3}; row 1 · x = [−1, 2, 0, 1] → {1, 3}
    assert _points(traced, "image", 0) == {(0, 0, 0, 0), (0, 2, 0, 0), (0, 3, 0, 0)}
    assert _points(traced, "image", 1) == {(0, c, 0, 0) for c in range(4)}


def test_add_routes_each_point_to_the_larger_summand() -> None:
    x = np.array([[1, -3], [2, 0]], dtype=np.float32).reshape(1, 1, 2, 2)
    model = _graph([
        helper.make_node("Conv", ["image", "wa"], ["a"]),  # 2x
        helper.make_node("Conv", ["image", "wb"], ["b"]),  # −x
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Flatten", ["sum"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ], {"wa": [[[[2]]]], "wb": [[[[-1]]]],
        "fc": [[1, 1, 1, 1], [0, -1, 0, 0], [-1, 1, -1, 0]]}, [1, 1, 2, 2], [1, 3])
    _, traced = _trace(model, x, [0, 1, 2])
    # class 0 picks (1, 0): a = 4 > b = −2; class 1 picks (0, 1): b = 3 > a = −6;
    # class 2 picks (1, 1), where a = b = 0: the tie goes to the first input.
    assert _points(traced, "a", 0) == {(0, 0, 1, 0)} and _points(traced, "b", 0) == set()
    assert _points(traced, "b", 1) == {(0, 0, 0, 1)} and _points(traced, "a", 1) == set()
    assert _points(traced, "a", 2) == {(0, 0, 1, 1)} and _points(traced, "b", 2) == set()
    assert [_points(traced, "image", k) for k in range(3)] == [
        {(0, 0, 1, 0)}, {(0, 0, 0, 1)}, {(0, 0, 1, 1)}]


def test_concat_routes_by_channel_and_subtracts_the_offset() -> None:
    x = np.array([[1, 2], [3, 4]], dtype=np.float32).reshape(1, 1, 2, 2)
    model = _graph([
        helper.make_node("Conv", ["image", "wa"], ["a"]),  # channels x, 2x
        helper.make_node("Conv", ["image", "wb"], ["b"]),  # channel 3x
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ], {"wa": [[[[1]]], [[[2]]]], "wb": [[[[3]]]], "fc": [[1, 0, -1], [0, 1, 1]]},
        [1, 1, 2, 2], [1, 2])
    _, traced = _trace(model, x, [0, 1])
    # gap = [2.5, 5, 7.5]: class 0 keeps channel 0, class 1 channels 1 and 2; every GAP
    # argmax is the 4 at (1, 1).
    assert _points(traced, "cat", 0) == {(0, 0, 1, 1)}
    assert _points(traced, "cat", 1) == {(0, 1, 1, 1), (0, 2, 1, 1)}
    assert _points(traced, "a", 1) == {(0, 1, 1, 1)}
    assert _points(traced, "b", 1) == {(0, 0, 1, 1)}  # channel 2 − offset 2
    assert _points(traced, "image", 0) == _points(traced, "image", 1) == {(0, 0, 1, 1)}


def test_strided_padded_conv_never_picks_padding() -> None:
    # 3×3 stride-2 pad-1 conv of ones: output (0, 0) sees taps (−1..1, −1..1).
    x = np.full((1, 1, 4, 4), -1.0, dtype=np.float32)
    x[0, 0, 0, 0] = 5.0  # a corner of output (0, 0)'s window, next to the padding
    x[0, 0, 2:, 2:] = -2.0  # output (1, 1)'s window (rows, columns 1..3) is all negative
    model = _graph([
        helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Flatten", ["conv"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ], {"w": np.ones((1, 1, 3, 3)), "fc": [[1, 0, 0, 0], [0, 0, 0, -1]]}, [1, 1, 4, 4],
        [1, 2])
    _, traced = _trace(model, x, [0, 1])
    assert _points(traced, "conv", 1) == {(0, 0, 1, 1)}
    assert _points(traced, "image", 0) == {(0, 0, 0, 0)}  # the 5, not a padded zero
    # A dead window falls back to its centre tap: (1·2 − 1 + 1) = 2.
    assert _points(traced, "image", 1) == {(0, 0, 2, 2)}


def test_unsupported_op_leaves_the_model_serving_without_fixations() -> None:
    from tests import handmade

    model = handmade.build("nhwc").model  # has a Tanh between two MatMuls: supported
    assert compile_model(model, layout=Layout.NHWC).fixations is not None
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for node in bad.graph.node:
        if node.op_type == "Tanh":
            node.op_type = "Neg"  # differentiable, but no fixation rule
    compiled = compile_model(bad, layout=Layout.NHWC)
    assert compiled.fixations is None and compiled.fixations_plan is None
    assert "Neg node" in str(compiled.fixations_error)
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    assert not engine.has_fixations and Capability.FIXATIONS in METHODS["fixations"].requires


# --- (b) the vectorised walk against a per-point reference on the zoo ------------------

PASS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid",
        "BatchNormalization", "LayerNormalization", "Erf", "Dropout", "Identity", "Softmax"}


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class ReferenceWalker:
    """CNN Fixations one point at a time, straight from the ONNX nodes.

    Slice, Split and Gather, which only move elements, are run by ONNX Runtime on an "iota" (each
    element holding its own flat index), so the value at an output point names its source.
    """

    def __init__(self, model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
        self.model = model
        self.graph = model.graph
        self.values = values
        self.weights = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.dynamic = {self.graph.input[0].name}
        for node in self.graph.node:
            if any(i in self.dynamic for i in node.input):
                self.dynamic.update(node.output)
        self.iotas: dict[int, list[np.ndarray]] = {}

    def walk(self, logits: str, cls: int) -> dict[str, set[tuple[int, ...]]]:
        pending: dict[str, set[tuple[int, ...]]] = defaultdict(set)
        pending[logits].add((0, cls))
        seen = {}
        for node in reversed(self.graph.node):
            for k, out in enumerate(node.output):
                points = pending.pop(out, set())
                if not points:
                    continue
                seen[out] = points
                for point in sorted(points):
                    for name, source in self.step(node, point, k):
                        if name in self.dynamic:
                            pending[name].add(source)
        image = self.graph.input[0].name
        seen[image] = pending.get(image, set())
        return seen

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.values[name].shape)

    def moved(self, node: onnx.NodeProto, k: int, p: tuple[int, ...]) -> tuple[int, ...]:
        """The source of output ``k``'s element ``p``: ``node`` run on an iota."""
        if id(node) not in self.iotas:
            x = node.input[0]
            nodes, inits = [], []
            for name in node.input[1:]:
                if not name:
                    continue
                if name in self.weights:
                    inits.append(numpy_helper.from_array(self.weights[name], name))
                elif self.producer[name].op_type == "Constant":
                    nodes.append(self.producer[name])
                else:
                    inits.append(numpy_helper.from_array(self.values[name], name))
            graph = helper.make_graph(
                [*nodes, node], "iota",
                [helper.make_tensor_value_info(x, TensorProto.INT64, self.shape(x))],
                [helper.make_tensor_value_info(o, TensorProto.INT64, None)
                 for o in node.output], initializer=inits)
            single = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            single.ir_version = self.model.ir_version
            iota = np.arange(int(np.prod(self.shape(x))), dtype=np.int64).reshape(self.shape(x))
            session = make_session(single, ["CPUExecutionProvider"], 1)
            self.iotas[id(node)] = session.run(list(node.output), {x: iota})
        flat = self.iotas[id(node)][k][p]
        return tuple(int(i) for i in np.unravel_index(int(flat), self.shape(node.input[0])))

    def step(self, node: onnx.NodeProto, p: tuple[int, ...],
             k: int = 0) -> list[tuple[str, tuple]]:
        op, a, x = node.op_type, _attrs(node), node.input[0]
        assert k == 0 or op == "Split", f"output {k} of {op} traced"
        if op in PASS:
            return [(x, p)]
        if op in ("Slice", "Split", "Gather"):
            return [(x, self.moved(node, k, p))]
        if op in ("Flatten", "Reshape"):
            flat = np.ravel_multi_index(p, self.shape(node.output[0]))
            return [(x, tuple(int(i) for i in np.unravel_index(flat, self.shape(x))))]
        if op == "Transpose":
            source = [0] * len(p)
            for i, axis in enumerate(a["perm"]):  # type: ignore[arg-type]
                source[axis] = p[i]
            return [(x, tuple(source))]
        if op in ("Add", "Sub", "Mul", "Div"):
            dyn = [i for i in node.input if i in self.dynamic]
            if len(dyn) == 1:
                return [(dyn[0], self.broadcast(p, self.shape(dyn[0])))]
            assert op in ("Add", "Mul"), f"{op} of two image-dependent tensors"
            if op == "Mul":
                full = [i for i in dyn if self.shape(i) == self.shape(node.output[0])]
                return [(i, self.broadcast(p, self.shape(i))) for i in full or dyn]
            best = dyn[0]
            for other in dyn[1:]:  # strictly larger wins: ties stay with the first
                if (self.values[other][self.broadcast(p, self.shape(other))]
                        > self.values[best][self.broadcast(p, self.shape(best))]):
                    best = other
            return [(best, self.broadcast(p, self.shape(best)))]
        if op == "Concat":
            axis, offset = int(a["axis"]) % len(p), 0  # type: ignore[call-overload]
            for name in node.input:
                size = self.shape(name)[axis]
                if offset <= p[axis] < offset + size:
                    return [(name, p[:axis] + (p[axis] - offset,) + p[axis + 1:])]
                offset += size
            raise AssertionError("channel out of range")
        if op in ("GlobalAveragePool", "ReduceMean"):
            return [(x, self.spatial_argmax(node, p))]
        if op in ("MaxPool", "AveragePool"):
            return self.pool(node, a, p)
        if op == "Conv":
            return self.conv(node, a, p)
        if op in ("Gemm", "MatMul"):
            return self.fc(node, a, p)
        raise AssertionError(f"reference walker has no rule for {op}")

    @staticmethod
    def broadcast(p: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        tail = p[len(p) - len(shape):]
        return tuple(0 if size == 1 else i for i, size in zip(tail, shape))

    def spatial_argmax(self, node: onnx.NodeProto, p: tuple[int, ...]) -> tuple[int, ...]:
        x = self.values[node.input[0]]
        axes = [2, 3]
        if node.op_type == "ReduceMean":  # axes an attribute, an input from opset 18
            given = _attrs(node).get("axes")
            axes = sorted(int(a) % x.ndim for a in (  # type: ignore[union-attr]
                given if given is not None else self.weights[node.input[1]].tolist()))
        assert axes in ([1, 2], [2, 3]), axes
        nhwc = axes == [1, 2]  # the zoo reduces NHWC maps over axes 1, 2
        b, c = p[0], p[-1] if nhwc else p[1]
        height, width = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
        best, where = -np.inf, (0, 0)
        for y in range(height):
            for xx in range(width):
                v = x[b, y, xx, c] if nhwc else x[b, c, y, xx]
                if v > best:
                    best, where = v, (y, xx)
        return (b, *where, c) if nhwc else (b, c, *where)

    def pool(self, node: onnx.NodeProto, a: dict[str, object],
             p: tuple[int, ...]) -> list[tuple[str, tuple]]:
        x = self.values[node.input[0]]
        kh, kw = a["kernel_shape"]  # type: ignore[misc]
        sy, sx = a.get("strides", [1, 1])  # type: ignore[misc]
        py, px = list(a.get("pads", [0, 0, 0, 0]))[:2]  # type: ignore[call-overload]
        b, c, oy, ox = p
        best, where = -np.inf, None
        for ky in range(kh):
            for kx in range(kw):
                y, xx = oy * sy - py + ky, ox * sx - px + kx
                if 0 <= y < x.shape[2] and 0 <= xx < x.shape[3] and x[b, c, y, xx] > best:
                    best, where = x[b, c, y, xx], (y, xx)
        return [] if where is None else [(node.input[0], (b, c, *where))]

    def conv(self, node: onnx.NodeProto, a: dict[str, object],
             p: tuple[int, ...]) -> list[tuple[str, tuple]]:
        assert a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        x, w = self.values[node.input[0]], self.weights[node.input[1]]
        group = int(a.get("group", 1))  # type: ignore[call-overload]
        sy, sx = a.get("strides", [1, 1])  # type: ignore[misc]
        dy, dx = a.get("dilations", [1, 1])  # type: ignore[misc]
        py, px = list(a.get("pads", [0, 0, 0, 0]))[:2]  # type: ignore[call-overload]
        m_total, cg, kh, kw = w.shape
        b, m, oy, ox = p
        first = (m // (m_total // group)) * cg
        inside = []
        for ky in range(kh):
            for kx in range(kw):
                y, xx = oy * sy - py + ky * dy, ox * sx - px + kx * dx
                if 0 <= y < x.shape[2] and 0 <= xx < x.shape[3]:
                    inside.append((ky, kx, y, xx))
        if not inside:
            return []
        sums = np.zeros(cg)
        for ky, kx, y, xx in inside:
            sums += x[b, first:first + cg, y, xx].astype(np.float64) * w[m, :, ky, kx]
        channel = int(np.argmax(sums))
        best, where = -np.inf, None
        for ky, kx, y, xx in inside:
            value = float(x[b, first + channel, y, xx]) * float(w[m, channel, ky, kx])
            if value > best:
                best, where = value, (y, xx)
        if not best > 0:  # dead window: the centre tap, moved into range
            kys = [t[0] for t in inside]
            kxs = [t[1] for t in inside]
            ky = min(max((kh - 1) // 2, min(kys)), max(kys))
            kx = min(max((kw - 1) // 2, min(kxs)), max(kxs))
            where = (oy * sy - py + ky * dy, ox * sx - px + kx * dx)
        return [(node.input[0], (b, first + channel, *where))]  # type: ignore[misc]

    def is_spatial(self, name: str) -> bool:
        while len(self.shape(name)) != 4:
            node = self.producer.get(name)
            if node is None or node.op_type not in PASS | {"Flatten", "Reshape"}:
                return False
            name = node.input[0]
        node = self.producer.get(name)
        shape = self.shape(name)
        if node is not None and node.op_type == "Transpose" and list(
                _attrs(node)["perm"]) == [0, 2, 3, 1]:  # type: ignore[call-overload]
            return shape[1] * shape[2] > 1
        return shape[2] * shape[3] > 1

    def fc(self, node: onnx.NodeProto, a: dict[str, object],
           p: tuple[int, ...]) -> list[tuple[str, tuple]]:
        x, w = self.values[node.input[0]], self.weights[node.input[1]]
        if node.op_type == "MatMul" or not a.get("transB", 0):
            w = w.T
        row, i = x[p[:-1]], p[-1]
        products = [float(row[j]) * float(w[i, j]) for j in range(len(row))]
        if self.is_spatial(node.input[0]):
            best = 0
            for j, value in enumerate(products):
                if value > products[best]:
                    best = j
            return [(node.input[0], (*p[:-1], best))]
        return [(node.input[0], (*p[:-1], j)) for j, v in enumerate(products) if v > 0]


def _with_all_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    full = onnx.ModelProto()
    full.CopyFrom(model)
    known = {o.name for o in full.graph.output}
    for node in full.graph.node:
        for out in node.output:
            if out and out not in known and node.op_type != "Constant":
                full.graph.output.append(onnx.ValueInfoProto(name=out))
    return full


@cache
def _zoo(name: str) -> tuple[Engine, dict[str, np.ndarray], dict[str, np.ndarray]]:
    meta = MANIFEST[name]
    model = onnx.load(str(ZOO / str(meta["onnx"])))
    engine = Engine(compile_model(model, layout=Layout(str(meta["layout"])),
                                  activation=str(meta["final_activation"])),
                    ["CPUExecutionProvider"], 1)
    with np.load(ZOO / str(meta["npz"])) as data:
        x = data["x"].astype(np.float32)
    full = _with_all_outputs(model)
    session = make_session(full, ["CPUExecutionProvider"], 1)
    names = [o.name for o in full.graph.output]
    values = dict(zip(names, session.run(names, {str(meta["input"]): x})))
    values[str(meta["input"])] = x
    return engine, values, engine.all_activations(x).activations


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_vectorised_walk_equals_reference_point_for_point(name: str) -> None:
    engine, values, _ = _zoo(name)
    plan = engine.compiled.fixations_plan
    assert plan is not None, engine.compiled.fixations_error
    model = onnx.load(str(ZOO / str(MANIFEST[name]["onnx"])))
    reference = ReferenceWalker(model, values)
    classes = [0, 1]
    traced = walk(plan, values, classes, trace=True)
    for tag, cls in enumerate(classes):
        want = reference.walk(str(MANIFEST[name]["logits_tensor"]), cls)
        assert want[plan.image], "the class traces back to some image pixels"
        for tensor, points in want.items():
            assert _points(traced, tensor, tag) == points, (name, cls, tensor)
        assert set(traced) == set(want)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_exposed_activations_match_the_full_graph(name: str) -> None:
    engine, values, exposed = _zoo(name)
    plan = engine.compiled.fixations_plan
    assert plan is not None and set(exposed) == set(plan.needed)
    for tensor, value in exposed.items():
        np.testing.assert_allclose(value, values[tensor], rtol=1e-4, atol=1e-4)
    points = walk(plan, exposed, [0])[plan.image]
    height, width = plan.image_hw
    xy = image_points(plan, points, 0)
    assert len(xy) and (xy >= 0).all() and (xy < [width, height]).all()


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_the_fixations_graph_stands_in_for_the_backbone(name: str) -> None:
    """On a CNN Fixations request the fixations graph's forward pass is the request's and
    the backbone does not run. Its activations and logits are the backbone's within float
    rounding: bit for bit where exposing the layers changes no fusion (DenseNet, VGG,
    Inception here); 3.6e-6 apart on ResNet, whose Conv fuses the residual Add only when
    the sum is not an output."""
    engine, values, _ = _zoo(name)
    x = values[str(MANIFEST[name]["input"])]
    acts, logits = engine.forward(x)
    trace = engine.all_activations(x)
    for got, want in ((trace.acts, acts), (trace.logits, logits)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    if name in ("densenet", "vgg", "inception"):
        np.testing.assert_array_equal(trace.acts, acts)
    ran: list[Capability] = []
    run = engine.run

    def counted(cap: Capability, *args: object) -> list[np.ndarray]:
        ran.append(cap)
        return run(cap, *args)  # type: ignore[arg-type]

    batch = np.concatenate([x, x])
    engine.run = counted  # type: ignore[method-assign]
    try:
        captures = engine.capture(batch, Activation.SIGMOID, fixations=[1])
        (got,) = METHODS["fixations"].compute(captures, rows([0], image=1))
    finally:
        del engine.run
    # Image 1 through the fixations graph, once (the walk reads what it left); image 0 alone
    # through the backbone.
    assert ran == [Capability.FIXATIONS, Capability.BACKBONE]
    np.testing.assert_array_equal(captures.activations[1], trace.acts[0])
    np.testing.assert_array_equal(captures.logits[1], trace.logits[0])
    (want,) = METHODS["fixations"].compute(engine.capture(batch, Activation.SIGMOID),
                                           rows([0], image=1))
    assert want.points is not None and len(want.points)
    np.testing.assert_array_equal(got.points, want.points)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.values, want.values)


def test_cached_graph_rebuilds_the_same_plan() -> None:
    engine, values, _ = _zoo("nhwc")
    compiled = engine.compiled
    assert compiled.fixations is not None and compiled.fixations_plan is not None
    again = plan_from_graph(compiled.fixations, compiled.split)
    assert again.image_layout is Layout.NHWC and again.needed == compiled.fixations_plan.needed
    a = walk(again, values, [0, 1])[again.image]
    b = walk(compiled.fixations_plan, values, [0, 1])[again.image]
    np.testing.assert_array_equal(a, b)


# --- (b2) Slice and every Split output: index arithmetic, against the reference ---------

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)
BODY = (1, 4, 6, 7)  # what the op under test reads: Conv 3×3 → Relu of a (1, 2, 6, 7) image


def _moving(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
            opset: int) -> onnx.ModelProto:
    """image (1, 2, 6, 7) → Conv 3×3 pad 1 → Relu → "body" → ``nodes`` → "moved" → Flatten
    → logits: every logit is one element of "moved", so tracing every class traces every
    element of the op's output(s)."""
    weights = np.random.default_rng(3).normal(size=(4, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["body"]), *nodes,
         helper.make_node("Flatten", ["moved"], ["logits"])], "moving",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 2, 6, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weights, "w"),
                     *(numpy_helper.from_array(v, k) for k, v in inits.items())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    if not inferred.graph.output[0].type.tensor_type.HasField("shape"):
        # ONNX infers no shape for opset-1 Slice: write the shapes ONNX Runtime computes
        # into value_info, as exporters do.
        full = _with_all_outputs(model)
        x = np.zeros((1, 2, 6, 7), dtype=np.float32)
        session = make_session(full, ["CPUExecutionProvider"], 1)
        names = [o.name for o in full.graph.output]
        model.graph.ClearField("output")
        for name, value in zip(names, session.run(names, {"image": x})):
            info = helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape)
            (model.graph.output if name == "logits" else model.graph.value_info).append(info)
    else:
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def _walks_like_the_reference(model: onnx.ModelProto, x: np.ndarray, logits: str,
                              classes: list[int], traced: dict[str, np.ndarray]) -> None:
    full = _with_all_outputs(model)
    session = make_session(full, ["CPUExecutionProvider"], 1)
    names = [o.name for o in full.graph.output]
    values = dict(zip(names, session.run(names, {model.graph.input[0].name: x})))
    reference = ReferenceWalker(model, values | {model.graph.input[0].name: x})
    reached: set[str] = set()
    for tag, cls in enumerate(classes):
        want = reference.walk(logits, cls)
        assert want[model.graph.input[0].name], "the class traces back to some image pixels"
        reached |= set(want)
        for tensor in set(want) | set(traced):
            assert _points(traced, tensor, tag) == want.get(tensor, set()), (cls, tensor)
    assert reached == set(traced)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _slice(starts: list[int], ends: list[int], axes: list[int] | None = None,
           steps: list[int] | None = None, opset: int = 13) -> onnx.ModelProto:
    if opset < 10:  # starts, ends, axes as attributes, no steps
        extra = {} if axes is None else {"axes": axes}
        return _moving([helper.make_node("Slice", ["body"], ["moved"], starts=starts,
                                         ends=ends, **extra)], {}, opset)
    inits = {"starts": _i64(*starts), "ends": _i64(*ends)}
    inputs = ["body", "starts", "ends"]
    if axes is not None or steps is not None:
        inputs.append("" if axes is None else "axes")
        if axes is not None:
            inits["axes"] = _i64(*axes)
    if steps is not None:
        inputs.append("steps")
        inits["steps"] = _i64(*steps)
    return _moving([helper.make_node("Slice", inputs, ["moved"])], inits, opset)


def _constant_int32_slice() -> onnx.ModelProto:
    """starts/ends as int32 Constant nodes rather than initializers, axes negative."""
    def const(name: str, *values: int) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array(values, dtype=np.int32), name))
    return _moving([const("s", 2, -6), const("e", -1, 3), const("a", -1, -3),
                    helper.make_node("Slice", ["body", "s", "e", "a"], ["moved"])], {}, 13)


def _split(order: list[int], opset: int, axis: int, sizes: list[int] | None = None,
           outputs: int | None = None, num_outputs: bool = False) -> onnx.ModelProto:
    """Split "body", then Concat the outputs in ``order`` (outputs missing from it unused)."""
    n = outputs or len(sizes or [])
    parts = [f"part{k}" for k in range(n)]
    inits, inputs, attrs = {}, ["body"], {"axis": axis}
    if sizes is not None and opset >= 13:
        inits["split"] = _i64(*sizes)
        inputs.append("split")
    elif sizes is not None:
        attrs["split"] = sizes
    if num_outputs:
        attrs["num_outputs"] = n
    nodes = [helper.make_node("Split", inputs, parts, **attrs),
             helper.make_node("Concat", [parts[k] for k in order], ["moved"], axis=axis)]
    return _moving(nodes, inits, opset)


MOVES = {
    "crop_hw_cropping2d": lambda: _slice([1, 1], [-1, -2], [2, 3]),
    "first_channels_ghostnet": lambda: _slice([0], [3], [1]),
    "negative_steps": lambda: _slice([-1, 5], [INT64_MIN, 0], [3, 2], [-2, -1]),
    "step_2_end_past_the_axis": lambda: _slice([1], [INT64_MAX], [-2], [2]),
    "no_axes_leading_axes": lambda: _slice([0, 1, 2], [1, 3, 5]),
    "clamped_out_of_range": lambda: _slice([-100, 100], [100, -100], [1, 3], [1, -3]),
    "batch_axis_whole": lambda: _slice([0, 2], [INT64_MAX, 5], [0, 2], opset=18),
    "opset9_attributes": lambda: _slice([1, 0], [5, 6], [3, 2], opset=9),
    "opset9_attributes_no_axes": lambda: _slice([0, 1, 1], [1, 4, -1], opset=9),
    "constant_nodes_int32": _constant_int32_slice,
    "split_input_opset13": lambda: _split([1, 0], 13, 1, sizes=[1, 3]),
    "split_attribute_opset11": lambda: _split([2, 0, 1], 11, 3, sizes=[2, 4, 1]),
    "split_equal_parts": lambda: _split([2, 1, 0], 13, 2, outputs=3),
    "split_equal_parts_opset11": lambda: _split([1, 0], 11, 1, outputs=2),
    "split_num_outputs_uneven_opset18": lambda: _split([1, 2, 0], 18, -1, outputs=3,
                                                       num_outputs=True),
    "split_input_opset18": lambda: _split([0, 1], 18, 2, sizes=[4, 2]),
    "split_some_outputs_unused": lambda: _split([2, 1], 13, 3, sizes=[3, 2, 2]),
}


@pytest.mark.parametrize("name", list(MOVES), ids=list(MOVES))
def test_slice_and_split_move_every_point_like_the_reference(name: str) -> None:
    model = MOVES[name]()
    x = np.random.default_rng(5).normal(size=(1, 2, 6, 7)).astype(np.float32)
    n = int(np.prod(_shape(model, "logits")[1:]))
    plan, traced = _trace(model, x, list(range(n)))
    assert {s.rule for s in plan.steps} >= {"slice"}
    # Every element of the output has exactly one source in "body".
    for tag in range(n):
        assert len(_points(traced, "body", tag)) == 1
    _walks_like_the_reference(model, x, "logits", list(range(n)), traced)


def _shape(model: onnx.ModelProto, name: str) -> tuple[int, ...]:
    inferred = onnx.shape_inference.infer_shapes(model)
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        if vi.name == name:
            return tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
    raise KeyError(name)


def test_slice_with_negative_steps_by_hand() -> None:
    # y = x[:, :, ::-1, 3::-2] of a 3×4 image: y[i, j] = x[2 − i, 3 − 2j].
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    model = _graph([
        helper.make_node("Slice", ["image", "s", "e", "a", "st"], ["moved"]),
        helper.make_node("Flatten", ["moved"], ["logits"]),
    ], {}, [1, 1, 3, 4], [1, 6], ints={"s": _i64(-1, 3), "e": _i64(INT64_MIN, -5),
                                       "a": _i64(2, 3), "st": _i64(-1, -2)})
    plan, traced = _trace(model, x, list(range(6)))
    assert plan.steps[-1].attrs == {"starts": [0, 0, 2, 3], "steps": [1, 1, -1, -2]}
    for tag in range(6):
        i, j = divmod(tag, 2)
        assert _points(traced, "image", tag) == {(0, 0, 2 - i, 3 - 2 * j)}


def test_split_output_k_is_offset_by_the_sizes_before_it() -> None:
    # Split [2, 3] along W, Concat(part1, part0): logits = [x2, x3, x4, x0, x1].
    x = np.arange(5, dtype=np.float32).reshape(1, 1, 1, 5)
    model = _graph([
        helper.make_node("Split", ["image", "sizes"], ["p0", "p1"], axis=3),
        helper.make_node("Concat", ["p1", "p0"], ["moved"], axis=3),
        helper.make_node("Flatten", ["moved"], ["logits"]),
    ], {}, [1, 1, 1, 5], [1, 5], ints={"sizes": _i64(2, 3)})
    plan, traced = _trace(model, x, list(range(5)))
    assert [(s.op_type, s.output) for s in plan.steps][-2:] == [("Split", "p0"),
                                                                 ("Split", "p1")]
    assert [_points(traced, "image", tag) for tag in range(5)] == [
        {(0, 0, 0, c)} for c in (2, 3, 4, 0, 1)]


def test_slice_with_starts_computed_at_run_time_is_refused() -> None:
    # starts = Shape(image)[3] − 2: not a constant for the plan (specialisation folds it).
    model = _graph([
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Gather", ["shape", "three"], ["width"], axis=0),
        helper.make_node("Sub", ["width", "two"], ["start"]),
        helper.make_node("Slice", ["image", "start", "end", "axes"], ["moved"]),
        helper.make_node("Flatten", ["moved"], ["logits"]),
    ], {}, [1, 1, 1, 5], [1, 2], ints={"three": _i64(3), "two": _i64(2),
                                       "end": _i64(INT64_MAX), "axes": _i64(3)})
    model.graph.value_info.append(  # even where the output's shape is known
        helper.make_tensor_value_info("moved", TensorProto.FLOAT, [1, 1, 1, 2]))
    split = Split("image", "logits", "logits", "none", "image", Layout.NCHW, (1, 1, 1))
    with pytest.raises(CompileError, match="its starts 'start' is not a constant"):
        build_plan(model, split, Layout.NCHW)


def _small_network() -> onnx.ModelProto:
    """A ShuffleNet-V2 unit (Split, channel shuffle), a GhostNet module (Concat, then a
    channel Slice) and a Keras Cropping2D (an NHWC Slice), then GAP → Gemm."""
    rng = np.random.default_rng(11)

    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.5).astype(np.float32)

    inits = {
        "stem_w": w(8, 3, 3, 3), "stem_b": w(8), "b1_w": w(4, 4, 1, 1), "b2_w": w(4, 1, 3, 3),
        "b3_w": w(4, 4, 1, 1), "b3_b": w(4), "halves": _i64(4, 4),
        "shuffle1": _i64(1, 2, 4, 12, 12), "shuffle2": _i64(1, 8, 12, 12),
        "ghost_w": w(3, 8, 1, 1), "cheap_w": w(3, 1, 3, 3), "ghost_s": _i64(0),
        "ghost_e": _i64(5), "ghost_a": _i64(1), "crop_s": _i64(1, 2), "crop_e": _i64(-1, -1),
        "crop_a": _i64(1, 2), "fc_w": w(4, 5), "fc_b": w(4),
    }
    nodes = [
        helper.make_node("Conv", ["image", "stem_w", "stem_b"], ["stem_c"], pads=[1] * 4),
        helper.make_node("Relu", ["stem_c"], ["stem"]),
        helper.make_node("Split", ["stem", "halves"], ["left", "right"], axis=1),
        helper.make_node("Conv", ["right", "b1_w"], ["r1"]),
        helper.make_node("Relu", ["r1"], ["r1r"]),
        helper.make_node("Conv", ["r1r", "b2_w"], ["r2"], pads=[1] * 4, group=4),
        helper.make_node("Conv", ["r2", "b3_w", "b3_b"], ["r3"]),
        helper.make_node("Relu", ["r3"], ["r3r"]),
        helper.make_node("Concat", ["left", "r3r"], ["unit"], axis=1),
        helper.make_node("Reshape", ["unit", "shuffle1"], ["groups"]),
        helper.make_node("Transpose", ["groups"], ["swapped"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["swapped", "shuffle2"], ["shuffled"]),
        helper.make_node("Conv", ["shuffled", "ghost_w"], ["primary_c"]),
        helper.make_node("Relu", ["primary_c"], ["primary"]),
        helper.make_node("Conv", ["primary", "cheap_w"], ["cheap_c"], pads=[1] * 4, group=3),
        helper.make_node("Relu", ["cheap_c"], ["cheap"]),
        helper.make_node("Concat", ["primary", "cheap"], ["ghosts"], axis=1),
        helper.make_node("Slice", ["ghosts", "ghost_s", "ghost_e", "ghost_a"], ["ghost"]),
        helper.make_node("Transpose", ["ghost"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Slice", ["nhwc", "crop_s", "crop_e", "crop_a"], ["cropped"]),
        helper.make_node("Transpose", ["cropped"], ["features"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    return _graph(nodes, {k: v for k, v in inits.items() if v.dtype == np.float32},
                  [1, 3, 12, 12], [1, 4],
                  ints={k: v for k, v in inits.items() if v.dtype == np.int64})


def test_small_network_with_slices_and_splits_walks_like_the_reference() -> None:
    model = _small_network()
    compiled = compile_model(model, target_layer="features")
    assert compiled.fixations_error is None and compiled.guided_error is None
    plan = compiled.fixations_plan
    assert plan is not None
    assert {(s.op_type, s.output) for s in plan.steps if s.rule == "slice"} == {
        ("Split", "left"), ("Split", "right"), ("Slice", "ghost"), ("Slice", "cropped")}
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    x = np.random.default_rng(12).normal(size=(1, 3, 12, 12)).astype(np.float32)
    acts = engine.all_activations(x).activations
    classes = [0, 1, 2, 3]
    traced = walk(plan, acts, classes, trace=True)
    assert len(traced["left"]) and len(traced["right"]), "both Split outputs are traced"
    _walks_like_the_reference(model, x, "logits", classes, traced)
    # And the method end to end: points on the image grid, a density map.
    captures = engine.capture(x, Activation.NONE)
    maps = METHODS["fixations"].compute(captures, rows(classes, Target.LOGIT))
    for raw in maps:
        assert raw.values.shape == (12, 12) and raw.points is not None and len(raw.points)


def _convnext_like() -> onnx.ModelProto:
    """A ConvNeXt block as timm's legacy export writes it: a depthwise conv, LayerNorm over
    each position's channels (NHWC, between Transposes), a 1×1 conv, GELU as
    Div → Erf → Add → Mul → Mul, a 1×1 conv, the residual Add; then GAP → Flatten →
    LayerNorm on the pooled vector → Gemm."""
    rng = np.random.default_rng(21)

    def w(*shape: int) -> np.ndarray:
        return (rng.normal(size=shape) * 0.5).astype(np.float32)

    inits = {"stem_w": w(6, 3, 2, 2), "stem_b": w(6), "dw_w": w(6, 1, 3, 3), "dw_b": w(6),
             "ln_s": w(6) + 1, "ln_b": w(6), "pw1_w": w(12, 6, 1, 1), "pw1_b": w(12),
             "sqrt2": np.float32(np.sqrt(2.0)), "one": np.float32(1.0),
             "half": np.float32(0.5), "pw2_w": w(6, 12, 1, 1), "pw2_b": w(6),
             "head_s": w(6) + 1, "head_b": w(6), "fc_w": w(4, 6), "fc_b": w(4)}
    nodes = [
        helper.make_node("Conv", ["image", "stem_w", "stem_b"], ["stem"], strides=[2, 2]),
        helper.make_node("Conv", ["stem", "dw_w", "dw_b"], ["dw"], pads=[1] * 4, group=6),
        helper.make_node("Transpose", ["dw"], ["dw_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["dw_nhwc", "ln_s", "ln_b"], ["ln"], axis=-1),
        helper.make_node("Transpose", ["ln"], ["ln_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["ln_nchw", "pw1_w", "pw1_b"], ["pw1"]),
        helper.make_node("Div", ["pw1", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf1"]),
        helper.make_node("Mul", ["pw1", "erf1"], ["gelu2"]),
        helper.make_node("Mul", ["gelu2", "half"], ["gelu"]),
        helper.make_node("Conv", ["gelu", "pw2_w", "pw2_b"], ["pw2"]),
        helper.make_node("Add", ["stem", "pw2"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("LayerNormalization", ["flat", "head_s", "head_b"], ["normed"],
                         axis=-1),
        helper.make_node("Gemm", ["normed", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    return _graph(nodes, inits, [1, 3, 16, 16], [1, 4])


def test_convnext_like_block_walks_like_the_reference() -> None:
    """LayerNormalization (per position and on the pooled vector) and Erf keep each point;
    before they had no rule, and ConvNeXt got no fixations at all."""
    model = _convnext_like()
    compiled = compile_model(model, target_layer="features")
    assert compiled.fixations_error is None
    plan = compiled.fixations_plan
    assert plan is not None
    assert {s.op_type for s in plan.steps if s.rule == "pass"} >= {"LayerNormalization", "Erf"}
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    x = np.random.default_rng(22).normal(size=(1, 3, 16, 16)).astype(np.float32)
    classes = [0, 1, 2, 3]
    traced = walk(plan, engine.all_activations(x).activations, classes, trace=True)
    assert len(traced["ln"]), "the points pass the LayerNorm"
    _walks_like_the_reference(model, x, "logits", classes, traced)


def _gathering(indices: np.ndarray, axis: int) -> onnx.ModelProto:
    """Conv → Gather of constant indices (a dynamo export's as_strided / index_select;
    repeated and negative indices, a 2-D index array) → conv → GAP → Gemm."""
    rng = np.random.default_rng(31)
    shape = [1, 4, 10, 10]
    gathered = shape[:axis] + list(indices.shape) + shape[axis + 1:]
    flat = gathered if len(gathered) == 4 else None
    inits = {"c1_w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "c2_w": rng.normal(size=(5, 4 if axis != 1 else indices.size, 1, 1)).astype(
                 np.float32),
             # Positive weights over rectified features: every class has some positive
             # contribution to trace back (the authors' FC rule keeps only those).
             "fc_w": np.abs(rng.normal(size=(3, 5))).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["image", "c1_w"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Gather", ["r1", "idx"], ["picked"], axis=axis)]
    source = "picked"
    if flat is None:  # a 2-D index array: back to 4-D for the conv
        merged = gathered[:axis] + [int(np.prod(indices.shape))] + gathered[axis + 2:]
        nodes.append(helper.make_node("Reshape", ["picked", "merged"], ["picked4"]))
        source = "picked4"
    nodes += [helper.make_node("Conv", [source, "c2_w"], ["c2"]),
              helper.make_node("Relu", ["c2"], ["features"]),
              helper.make_node("GlobalAveragePool", ["features"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flatv"]),
              helper.make_node("Gemm", ["flatv", "fc_w"], ["logits"], transB=1)]
    ints = {"idx": indices}
    if flat is None:
        ints["merged"] = np.asarray(merged, dtype=np.int64)
    return _graph(nodes, inits, [1, 3, 10, 10], [1, 3], ints=ints)


@pytest.mark.parametrize(("indices", "axis"), [
    (np.array([9, 0, 3, 3, -1, 5, 7, 2]), 3),          # columns, repeated and negative
    (np.array([[1, 2, 2], [8, 4, 0]]), 2),              # rows, a 2-D index array
    (np.array([3, 1, 1, 0, 2]), 1),                     # channels
], ids=["columns", "rows-2d", "channels"])
def test_gather_moves_every_point_like_the_reference(indices: np.ndarray, axis: int) -> None:
    model = _gathering(indices, axis)
    compiled = compile_model(model, target_layer="features")
    assert compiled.fixations_error is None
    plan = compiled.fixations_plan
    assert plan is not None and any(s.rule == "gather" for s in plan.steps)
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    x = np.random.default_rng(32).normal(size=(1, 3, 10, 10)).astype(np.float32)
    classes = [0, 1, 2]
    traced = walk(plan, engine.all_activations(x).activations, classes, trace=True)
    assert len(traced["r1"]), "the points pass the Gather"
    _walks_like_the_reference(model, x, "logits", classes, traced)


def test_gather_by_hand() -> None:
    """Output column j of a Gather on axis 3 with indices [2, 0] comes from column
    indices[j]; the other axes stay."""
    from service.methods.fixations import _gather
    step = type("S", (), {"attrs": {"axis": 3, "indices": np.array([2, 0])},
                          "inputs": ("x",)})()
    points = np.array([[0, 0, 1, 4, 0], [1, 0, 3, 2, 1]])  # [tag, b, c, y, x]
    ((name, moved),) = _gather(step, points, {})  # type: ignore[arg-type]
    assert name == "x"
    assert moved.tolist() == [[0, 0, 1, 4, 2], [1, 0, 3, 2, 0]]


# --- (c) outlier removal and the density map --------------------------------------------

def _reference_inliers(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    diag = 0.1 * np.sqrt(height ** 2 + width ** 2)
    keep = np.zeros(len(xy), dtype=bool)
    for i in range(len(xy)):
        near = sum(1 for j in range(len(xy))
                   if np.sqrt(float(((xy[i] - xy[j]) ** 2).sum())) < diag)
        keep[i] = near > 0.05 * len(xy)
    return keep


def _reference_density(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    counts = np.zeros((height, width))
    for x, y in xy:
        counts[y, x] += 1
    k = min(height, width) if min(height, width) % 2 else min(height, width) - 1
    sigma = 20.0 * min(height, width) / 224
    taps = np.exp(-((np.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma ** 2))
    taps /= taps.sum()
    half = k // 2
    padded = np.pad(counts, half, mode="reflect")  # numpy's reflect is cv2's REFLECT_101
    rows = np.array([[np.dot(padded[r, c:c + k], taps) for c in range(width)]
                     for r in range(padded.shape[0])])
    out = np.array([[np.dot(rows[r:r + k, c], taps) for c in range(width)]
                    for r in range(height)])
    return out / out.max()


def test_outlier_removal_matches_the_authors_rule(rng: np.random.Generator) -> None:
    height, width = 48, 64
    cluster = rng.normal([20, 30], 3, size=(60, 2)).round().astype(np.int64)
    strays = np.array([[2, 60], [45, 3], [46, 4], [0, 0]])
    xy = np.clip(np.concatenate([cluster, strays]), 0, [width - 1, height - 1])
    got = inliers(xy, height, width)
    np.testing.assert_array_equal(got, _reference_inliers(xy, height, width))
    assert got[:60].all() and not got[60:].any()
    assert inliers(np.zeros((0, 2), dtype=np.int64), height, width).shape == (0,)


def test_density_is_a_reflect101_gaussian_of_point_counts(rng: np.random.Generator) -> None:
    height, width = 48, 64
    xy = np.stack([rng.integers(0, width, 30), rng.integers(0, height, 30)], axis=1)
    xy = np.concatenate([xy, xy[:5]])  # duplicates count twice
    got = density(xy, height, width)
    assert got.shape == (height, width) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_density(xy, height, width), atol=1e-6)
    assert not density(np.zeros((0, 2), dtype=np.int64), height, width).any()


@pytest.mark.parametrize(("height", "width"), [(256, 256), (224, 300), (1, 5)])
def test_density_equals_cv2s_blur_of_the_count_image(rng: np.random.Generator, height: int,
                                                      width: int) -> None:
    """The separable-operator evaluation against the convolution it replaces."""
    xy = np.stack([rng.integers(0, width, 400), rng.integers(0, height, 400)], axis=1)
    counts = np.zeros((height, width))
    np.add.at(counts, (xy[:, 1], xy[:, 0]), 1.0)
    short = min(height, width)
    k = short if short % 2 else short - 1
    blurred = cv2.GaussianBlur(counts, (k, k), 20.0 * short / 224)
    np.testing.assert_allclose(density(xy, height, width), blurred / blurred.max(), atol=1e-6)
