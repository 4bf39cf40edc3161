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

from service.graph.build import compile_model
from service.graph.fixations import FixationPlan, build_plan, expose, plan_from_graph
from service.graph.target import Split
from service.methods import METHODS
from service.methods.fixations import density, image_points, inliers, walk
from service.models.spec import Layout
from service.runtime.engine import Engine
from service.runtime.sessions import make_session

ZOO = Path(__file__).resolve().parent.parent / "data" / "zoo"
MANIFEST: dict[str, dict[str, object]] = json.loads((ZOO / "manifest.json").read_text())
NAMES = list(MANIFEST)


# --- (a) graphs small enough to work out by hand ---------------------------------------

def _graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
           image: list[int], logits: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits)],
        initializer=[numpy_helper.from_array(np.asarray(v, dtype=np.float32), k)
                     for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _trace(model: onnx.ModelProto, x: np.ndarray,
           classes: list[int]) -> tuple[FixationPlan, dict[str, np.ndarray]]:
    split = Split("image", "logits", "logits", "none", "image", Layout.NCHW, (1, 1, 1))
    plan = build_plan(model, split, Layout.NCHW)
    exposed = expose(model, plan)
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
    assert not engine.has_fixations and METHODS["fixations"].needs_fixations


# --- (b) the vectorised walk against a per-point reference on the zoo ------------------

PASS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSwish", "HardSigmoid",
        "BatchNormalization", "Dropout", "Identity", "Softmax"}


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class ReferenceWalker:
    """CNN Fixations one point at a time, straight from the ONNX nodes."""

    def __init__(self, model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
        self.graph = model.graph
        self.values = values
        self.weights = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.dynamic = {self.graph.input[0].name}
        for node in self.graph.node:
            if any(i in self.dynamic for i in node.input):
                self.dynamic.update(node.output)

    def walk(self, logits: str, cls: int) -> dict[str, set[tuple[int, ...]]]:
        pending: dict[str, set[tuple[int, ...]]] = defaultdict(set)
        pending[logits].add((0, cls))
        seen = {}
        for node in reversed(self.graph.node):
            points = pending.pop(node.output[0], set())
            if not points:
                continue
            seen[node.output[0]] = points
            for point in sorted(points):
                for name, source in self.step(node, point):
                    if name in self.dynamic:
                        pending[name].add(source)
        image = self.graph.input[0].name
        seen[image] = pending.get(image, set())
        return seen

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.values[name].shape)

    def step(self, node: onnx.NodeProto, p: tuple[int, ...]) -> list[tuple[str, tuple]]:
        op, a, x = node.op_type, _attrs(node), node.input[0]
        if op in PASS:
            return [(x, p)]
        if op in ("Flatten", "Reshape"):
            flat = np.ravel_multi_index(p, self.shape(node.output[0]))
            return [(x, tuple(int(i) for i in np.unravel_index(flat, self.shape(x))))]
        if op == "Transpose":
            source = [0] * len(p)
            for k, axis in enumerate(a["perm"]):  # type: ignore[arg-type]
                source[axis] = p[k]
            return [(x, tuple(source))]
        if op in ("Add", "Mul"):
            dyn = [i for i in node.input if i in self.dynamic]
            if len(dyn) == 1:
                return [(dyn[0], self.broadcast(p, self.shape(dyn[0])))]
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
        nhwc = node.op_type == "ReduceMean"  # the zoo reduces NHWC maps over axes 1, 2
        if nhwc:
            assert list(_attrs(node)["axes"]) == [1, 2]  # type: ignore[call-overload]
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
    return engine, values, engine.all_activations(x)


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


def test_cached_graph_rebuilds_the_same_plan() -> None:
    engine, values, _ = _zoo("nhwc")
    compiled = engine.compiled
    assert compiled.fixations is not None and compiled.fixations_plan is not None
    again = plan_from_graph(compiled.fixations, compiled.split)
    assert again.image_layout is Layout.NHWC and again.needed == compiled.fixations_plan.needed
    a = walk(again, values, [0, 1])[again.image]
    b = walk(compiled.fixations_plan, values, [0, 1])[again.image]
    np.testing.assert_array_equal(a, b)


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
