"""The specialisation pass against ONNX Runtime: the same values before and after, shape
arithmetic folded, fixed-batch reshapes batching, and the graphs it unblocks.

The graphs are small handmade versions of what exporters write: torchvision ShuffleNet's
``chunk()`` as the legacy exporter writes it (Shape → Gather → Div → Slice), a dynamo head
ending in Reshape to ``[1, C]``, the legacy ``view(x.size(0), ...)`` reshapes of a channel
shuffle (Shape + Concat), "same" padding computed from the input size, an already static
graph, and dynamo's ``as_strided`` (a Gather from the flattened batch at positions computed
from the batch size, as in timm ConvNeXt's head).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from service import cli
from service.graph.autodiff import SEED, grad_name, vjp
from service.graph.build import CompiledModel, compile_model
from service.graph.cache import CompileCache
from service.graph.extract import extract
from service.graph.onnx_graph import GraphIndex
from service.graph.specialise import (
    contradiction,
    image_shape,
    specialise,
    static_input_shape,
)
from service.methods.fixations import walk
from service.models.repository import load_model
from service.models.spec import Layout
from service.runtime.engine import Engine
from service.runtime.sessions import make_session
from tests import handmade
from tests.handmade import TARGET, C, H, K, W
from tests.methods.test_fixations import ReferenceWalker, _points, _with_all_outputs

IN = 2  # image channels of the graphs below (3 where model.toml must say it)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _scalar(value: int) -> np.ndarray:
    return np.array(value, dtype=np.int64)


class _Graph:
    """Weights and nodes of one handmade classifier."""

    def __init__(self, seed: int, dtype: type, channels: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
        self.inits: dict[str, np.ndarray] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.weight("conv_w", C, channels, 3, 3)
        self.weight("conv_b", C)
        self.node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1])

    def weight(self, name: str, *shape: int) -> str:
        self.inits[name] = (self.rng.normal(size=shape) * 0.5).astype(self.dtype)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits[name] = value
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs: object) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))

    def head(self, source: str, flatten: Callable[[], None] | None = None) -> None:
        """GAP → flatten (Flatten unless given) → Gemm."""
        self.node("GlobalAveragePool", [source], ["gap"])
        if flatten is None:
            self.node("Flatten", ["gap"], ["flat"])
        else:
            flatten()
        self.node("Gemm", ["flat", self.weight("fc_w", K, C), self.weight("fc_b", K)],
                  ["scores"], transB=1)

    def model(self, in_shape: list[object], out_shape: list[object], *, opset: int = 17,
              info: tuple[tuple[str, list[object]], ...] = ()) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "specialise",
            [helper.make_tensor_value_info("image", self.elem, in_shape)],
            [helper.make_tensor_value_info("scores", self.elem, out_shape)],
            initializer=[numpy_helper.from_array(v, k) for k, v in self.inits.items()],
            # What exporters record of shapes they know (torch writes value_info).
            value_info=[helper.make_tensor_value_info(n, self.elem, s) for n, s in info],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def chunk(dtype: type = np.float32, channels: int = IN) -> onnx.ModelProto:
    """ShuffleNet-V2's unit as the legacy exporter writes ``x.chunk(2, dim=1)``."""
    g = _Graph(0, dtype, channels)
    g.node("Relu", ["conv"], ["r"])
    g.node("Shape", ["r"], ["shape"])
    g.node("Gather", ["shape", g.const("one", _ints(1))], ["c"], axis=0)
    g.node("Div", ["c", g.const("two", _ints(2))], ["half"])
    g.node("Mul", ["half", "two"], ["end"])
    g.node("Slice", ["r", g.const("zero", _ints(0)), "half", "one"], ["left"])
    g.node("Slice", ["r", "half", "end", "one"], ["right"])
    g.node("Conv", ["right", g.weight("b_w", C // 2, C // 2, 1, 1), g.weight("b_b", C // 2)],
           ["branch"])
    g.node("Relu", ["branch"], ["branch_relu"])
    g.node("Concat", ["left", "branch_relu"], ["cat"], axis=1)
    g.node("Conv", ["cat", g.weight("m_w", C, C, 1, 1), g.weight("m_b", C)], ["mixed"])
    g.node("Relu", ["mixed"], [TARGET])
    g.head(TARGET)
    return g.model(["N", channels, H, W], ["N", K], info=((TARGET, ["N", C, H, W]),))


def dynamo(dtype: type = np.float32, channels: int = IN, allowzero: int = 0) -> onnx.ModelProto:
    """A head as torch's dynamo exporter writes it: static batch of one, Reshape to [1, C]."""
    g = _Graph(1, dtype, channels)
    g.node("Relu", ["conv"], [TARGET])
    g.head(TARGET, lambda: g.node("Reshape", ["gap", g.const("flat_shape", _ints(1, C))],
                                  ["flat"], allowzero=allowzero))
    # dynamo records every intermediate shape, its batch of one included.
    info = (("conv", [1, C, H, W]), (TARGET, [1, C, H, W]), ("gap", [1, C, 1, 1]),
            ("flat", [1, C]))
    return g.model([1, channels, H, W], [1, K], opset=20, info=info)


def upsample(dtype: type = np.float32, channels: int = IN) -> onnx.ModelProto:
    """dynamo's ``interpolate(scale_factor=2)``: Resize to constant sizes, batch of one
    included, then a Reshape to [1, -1] that batches only once the Resize does."""
    g = _Graph(5, dtype, channels)
    g.node("Relu", ["conv"], ["r"])
    g.node("Resize", ["r", "", "", g.const("sizes", _ints(1, C, 2 * H, 2 * W))], [TARGET],
           mode="nearest")
    g.head(TARGET, lambda: g.node("Reshape", ["gap", g.const("flat_shape", _ints(1, -1))],
                                  ["flat"]))
    return g.model([1, channels, H, W], [1, K], opset=20)


def shuffle(dtype: type = np.float32, channels: int = IN) -> onnx.ModelProto:
    """A channel shuffle and a flatten with ``view(x.size(0), ...)`` (Shape + Concat)."""
    g = _Graph(2, dtype, channels)
    g.node("Relu", ["conv"], ["r"])
    g.node("Shape", ["r"], ["shape"])
    for k in range(4):
        g.node("Gather", ["shape", g.const(f"i{k}", _scalar(k))], [f"d{k}"], axis=0)
        g.node("Unsqueeze", [f"d{k}", g.const("axis0", _ints(0))], [f"u{k}"])
    g.node("Div", ["u1", g.const("groups", _ints(2))], ["per_group"])
    g.node("Concat", ["u0", "groups", "per_group", "u2", "u3"], ["shape5"], axis=0)
    g.node("Reshape", ["r", "shape5"], ["r5"])
    g.node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4])
    g.node("Concat", ["u0", g.const("minus_one", _ints(-1)), "u2", "u3"], ["shape4"], axis=0)
    g.node("Reshape", ["t5", "shape4"], [TARGET])

    def flatten() -> None:
        g.node("Shape", ["gap"], ["gap_shape"])
        g.node("Gather", ["gap_shape", "i0"], ["n"], axis=0)
        g.node("Unsqueeze", ["n", "axis0"], ["n1"])
        g.node("Concat", ["n1", "minus_one"], ["flat_shape"], axis=0)
        g.node("Reshape", ["gap", "flat_shape"], ["flat"])

    g.head(TARGET, flatten)
    return g.model(["N", channels, H, W], ["N", K], info=((TARGET, ["N", C, H, W]),))


def pad_same(dtype: type = np.float32, channels: int = IN) -> onnx.ModelProto:
    """TF-style "same" padding computed from the input size: pad H, W up to even."""
    g = _Graph(3, dtype, channels)
    g.node("Relu", ["conv"], ["r"])
    g.node("Shape", ["r"], ["shape"])
    two = g.const("two", _scalar(2))
    pads = []
    for axis, name in ((2, "h"), (3, "w")):
        g.node("Gather", ["shape", g.const(f"axis{axis}", _scalar(axis))], [name], axis=0)
        g.node("Mod", [name, two], [f"{name}_mod"])
        g.node("Sub", [two, f"{name}_mod"], [f"{name}_sub"])
        g.node("Mod", [f"{name}_sub", two], [f"{name}_pad"])
        g.node("Unsqueeze", [f"{name}_pad", g.const("axis0", _ints(0))], [f"{name}_pad1"])
        pads.append(f"{name}_pad1")
    g.node("Concat", [g.const("no_pad", _ints(0, 0, 0, 0, 0, 0)), *pads], ["pads"], axis=0)
    g.node("Pad", ["r", "pads"], ["padded"])
    g.node("MaxPool", ["padded"], [TARGET], kernel_shape=[2, 2], strides=[2, 2])
    g.head(TARGET)
    out_hw = [(H + H % 2) // 2, (W + W % 2) // 2]
    return g.model(["N", channels, H, W], ["N", K], info=((TARGET, ["N", C, *out_hw]),))


def static(dtype: type = np.float32, channels: int = IN) -> onnx.ModelProto:
    """Nothing to do: handmade's linear classifier."""
    assert channels == IN
    return handmade.build("linear", dtype=dtype).model


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "chunk": chunk, "dynamo": dynamo, "upsample": upsample, "shuffle": shuffle,
    "pad_same": pad_same, "static": static,
}
# What each graph lacks before the pass.
BLOCKED = {
    "chunk": {"guided", "fixations"},
    "dynamo": {"head_batches"},
    "upsample": {"head_batches"},
    "shuffle": {"fixations"},
    "pad_same": {"guided", "fixations"},
    "static": set(),
}
SHAPE = (1, IN, H, W)
by_case = pytest.mark.parametrize("case", list(BUILDERS))


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = make_session(model, ["CPUExecutionProvider"], 1)
    return session.run(None, {"image": x})  # type: ignore[no-any-return]


def _compile(model: onnx.ModelProto, **kw: object) -> CompiledModel:
    return compile_model(model, layout=Layout.NCHW, target_layer=TARGET, **kw)  # type: ignore[arg-type]


@by_case
def test_outputs_identical_and_the_input_model_untouched(case: str,
                                                         rng: np.random.Generator) -> None:
    model = BUILDERS[case]()
    before = model.SerializeToString()
    special = specialise(model, SHAPE)
    assert model.SerializeToString() == before
    onnx.checker.check_model(special, full_check=True)
    for _ in range(3):
        x = rng.normal(size=SHAPE).astype(np.float32)
        for got, want in zip(_run(special, x), _run(model, x), strict=True):
            np.testing.assert_array_equal(got, want)
    # The batch axis stays open: the specialised model runs a batch, one image at a time.
    batch = rng.normal(size=(3, *SHAPE[1:])).astype(np.float32)
    together = _run(special, batch)[0]
    singles = np.concatenate([_run(special, batch[i:i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(together, singles, rtol=1e-6, atol=1e-6)


@by_case
def test_only_shape_arithmetic_goes_and_every_other_name_stays(case: str) -> None:
    model = BUILDERS[case]()
    special = specialise(model, SHAPE)
    # Nodes on the data path (what the image's values flow through) all stay as they were.
    data = {"image"}
    for node in model.graph.node:
        if node.op_type != "Shape" and data & set(node.input):
            data.update(node.output)
    kept = {n.output[0]: n for n in special.graph.node}
    for node in model.graph.node:
        if node.output[0] in data:
            same = kept.get(node.output[0])
            assert same is not None, f"{node.op_type} {node.output[0]!r} was removed"
            # (A Resize to sizes that fix the batch gets axes without it.)
            attrs = [a for a in same.attribute if not (a.name == "axes" and "axes" not in {
                b.name for b in node.attribute})]
            assert (same.name, same.op_type, list(same.output), attrs) == (
                node.name, node.op_type, list(node.output), list(node.attribute))
            assert [i for i in same.input if i in data] == [i for i in node.input if i in data]
    assert not any(n.op_type == "Shape" for n in special.graph.node)
    # Every shape or index input the rules read is a constant now.
    index = GraphIndex(special)
    for node in special.graph.node:
        if node.op_type in ("Reshape", "Slice", "Pad", "Expand", "Split", "Resize"):
            for name in node.input[1:]:
                assert not name or index.is_constant(name), (node.name, name)
    if case == "static":
        assert special is model


def _reshape_targets(model: onnx.ModelProto) -> dict[str, list[int]]:
    index = GraphIndex(model)
    return {n.name: index.constant(n.input[1]).tolist()  # type: ignore[union-attr]
            for n in model.graph.node if n.op_type == "Reshape"}


def test_fixed_and_computed_batches_become_copies_of_the_batch() -> None:
    assert _reshape_targets(specialise(dynamo(), SHAPE)) == {"flat": [0, C]}
    # allowzero=1 reads 0 as an empty axis: the batch is inferred instead.
    assert _reshape_targets(specialise(dynamo(allowzero=1), SHAPE)) == {"flat": [-1, C]}
    assert _reshape_targets(specialise(shuffle(), SHAPE)) == {
        "r5": [0, 2, C // 2, H, W], TARGET: [0, C, H, W], "flat": [0, C]}
    # A Resize to sizes with the batch fixed resizes the other axes only; the Reshape after
    # it is then seen to read the batch.
    special = specialise(upsample(), SHAPE)
    assert _reshape_targets(special) == {"flat": [0, C]}
    resize = next(n for n in special.graph.node if n.op_type == "Resize")
    assert helper.get_attribute_value(next(a for a in resize.attribute if a.name == "axes")) \
        == [1, 2, 3]
    assert GraphIndex(special).constant(resize.input[3]).tolist() == [C, 2 * H, 2 * W]  # type: ignore[union-attr]
    # The dynamo graph's declared batch of one is open afterwards, outputs included.
    special = specialise(dynamo(), SHAPE)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (special.graph.input[0], special.graph.output[0])]
    assert dims == [["N", IN, H, W], ["N", K]]
    info = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in special.graph.value_info}
    assert info["flat"] == ["N", C] and info[TARGET] == ["N", C, H, W]


def _equal_graph_outputs(a: onnx.ModelProto, b: onnx.ModelProto,
                         feeds: dict[str, np.ndarray]) -> None:
    names = [o.name for o in a.graph.output]
    assert names == [o.name for o in b.graph.output]
    got = make_session(b, ["CPUExecutionProvider"], 1).run(names, feeds)
    want = make_session(a, ["CPUExecutionProvider"], 1).run(names, feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@by_case
def test_compile_unblocks_graphs_and_keeps_values(case: str, rng: np.random.Generator) -> None:
    model = BUILDERS[case]()
    before = _compile(model)
    after = _compile(model, input_shape=SHAPE)
    assert after.split == before.split
    assert after.guided is not None and after.fixations is not None
    assert after.head_vjp is not None
    assert (before.guided is None) == ("guided" in BLOCKED[case])
    assert (before.fixations is None) == ("fixations" in BLOCKED[case])
    if "guided" in BLOCKED[case]:
        assert "computed at run time" in str(before.guided_error)
    if "fixations" in BLOCKED[case]:
        assert "non-static shape" in str(before.fixations_error)
    # The graphs both compilations have compute the same values.
    x = rng.normal(size=SHAPE).astype(np.float32)
    acts = np.abs(rng.normal(size=(1, *before.split.target_shape))).astype(np.float32)
    seed = rng.normal(size=(1, K)).astype(np.float32)
    _equal_graph_outputs(before.backbone, after.backbone, {"image": x})
    _equal_graph_outputs(before.head, after.head, {TARGET: acts})
    if before.head_vjp is not None:
        _equal_graph_outputs(before.head_vjp, after.head_vjp, {TARGET: acts, SEED: seed})

    # The head runs a batch of three, equal to three runs of one.
    engine = Engine(after, ["CPUExecutionProvider"], 1, max_batch=8)
    assert engine.max_batch == 8
    assert (Engine(before, ["CPUExecutionProvider"], 1, max_batch=8).max_batch == 1) == (
        "head_batches" in BLOCKED[case])
    batch = np.abs(rng.normal(size=(3, *after.split.target_shape))).astype(np.float32)
    together = engine.head(batch)
    singles = np.concatenate([engine.head(batch[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, singles, rtol=1e-6, atol=1e-6)
    # So does the guided graph, with one copy of the image per seed.
    seeds = np.eye(K, dtype=np.float32)
    _, logits, grads = engine.guided(x, seeds)
    for k in range(K):
        _, _, one = engine.guided(x, seeds[k:k + 1])
        np.testing.assert_allclose(grads[k:k + 1], one, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(logits, np.repeat(_run(model, x)[0], K, axis=0))


@pytest.mark.parametrize("case", [c for c in BUILDERS if "guided" in BLOCKED[c]])
def test_the_unblocked_input_gradient_equals_finite_differences(
        case: str, rng: np.random.Generator) -> None:
    """Where the guided graph did not exist: the specialised backbone's plain input
    gradient (float64) against central differences of the original graph."""
    model = BUILDERS[case](dtype=np.float64)
    special = specialise(model, SHAPE)
    index = GraphIndex(special)
    forward = extract(index, ["image"], ["scores"], name="forward", batch=False)
    graph = vjp(forward, "scores", ["image"])
    x = rng.normal(size=SHAPE)
    seed = rng.normal(size=(1, K))
    (grad,) = ReferenceEvaluator(graph).run([grad_name("image")], {"image": x, SEED: seed})
    original = ReferenceEvaluator(model)
    eps, expected = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        diff = original.run(None, {"image": up})[0] - original.run(None, {"image": down})[0]
        expected[i] = float((seed * diff).sum()) / (2 * eps)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


def test_values_that_depend_on_the_batch_stay_computed(rng: np.random.Generator) -> None:
    """ConstantOfShape/Expand over the whole shape depend on the batch: kept (Shape too);
    an Expand that only needs the input's batch gets a constant shape with a 1 there."""
    g = _Graph(4, np.float32, IN)
    g.node("Relu", ["conv"], ["r"])
    g.node("Shape", ["r"], ["shape"])
    g.node("ConstantOfShape", ["shape"], ["ones"],
           value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    g.node("Expand", [g.weight("scale", C, 1, 1), "shape"], ["scale_full"])
    g.node("Mul", ["r", "scale_full"], ["scaled"])
    g.node("Add", ["scaled", "ones"], ["shifted"])
    g.node("ReduceMean", ["shifted", g.const("hw", _ints(2, 3))], ["mean"], keepdims=1)
    g.node("Slice", ["shape", g.const("from0", _ints(0)), g.const("to1", _ints(1))], ["n"])
    g.node("Concat", ["n", g.const("chw", _ints(C, H, W))], ["full"], axis=0)
    g.node("Expand", ["mean", "full"], ["spread"])
    g.node("Add", ["shifted", "spread"], [TARGET])
    g.head(TARGET)
    model = g.model(["N", IN, H, W], ["N", K], opset=18)
    special = specialise(model, SHAPE)
    ops = Counter(n.op_type for n in special.graph.node)
    assert ops["Shape"] == 1 and ops["ConstantOfShape"] == 1 and ops["Expand"] == 2
    assert ops["Slice"] == 0 and ops["Concat"] == 0
    spread = next(n for n in special.graph.node if n.name == "spread")
    assert GraphIndex(special).constant(spread.input[1]).tolist() == [1, C, H, W]  # type: ignore[union-attr]
    batch = rng.normal(size=(3, *SHAPE[1:])).astype(np.float32)
    np.testing.assert_array_equal(_run(special, batch)[0], _run(model, batch)[0])


def _open_size(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose image input leaves height and width open."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dims = copy.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return copy


def test_a_contradicting_shape_is_left_to_the_start_up_check() -> None:
    model = dynamo()
    assert static_input_shape(model) == SHAPE
    assert contradiction(model, SHAPE) is None
    wrong = (1, IN, H + 1, W)
    assert contradiction(model, wrong) == (
        f"the graph's image input 'image' has shape [1, {IN}, {H}, {W}], not "
        f"[1, {IN}, {H + 1}, {W}]")
    assert specialise(model, wrong) is model
    assert static_input_shape(_open_size(chunk())) is None
    assert image_shape(Layout.NHWC, 5, 4, 3) == (1, 5, 4, 3)
    assert image_shape(Layout.NCHW, 5, 4, 3) == (1, 3, 5, 4)


def test_the_cache_key_includes_the_input_shape() -> None:
    raw = dynamo().SerializeToString()
    keys = {CompileCache.key(raw, Layout.NCHW, None, None, shape)
            for shape in (None, SHAPE, (1, IN, H, W + 1))}
    assert len(keys) == 3


def test_compile_cli_reads_the_size_from_the_graph_or_the_options(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dynamo.onnx"
    onnx.save(dynamo(), path)
    assert cli.main(["compile", str(path), "--out", str(tmp_path / "a")]) == 0
    assert f"specialised to 1×{IN}×{H}×{W}" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["input_shape"] == list(SHAPE)
    head = onnx.load(tmp_path / "a" / "head.onnx")
    assert _reshape_targets(head) == {"flat": [0, C]}

    # A graph with an open size: specialised only when told it.
    path = tmp_path / "open.onnx"
    onnx.save(_open_size(chunk()), path)
    args = ["compile", str(path), "--target-layer", TARGET, "--activation", "none"]
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "not specialised" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "report.json").read_text())["input_shape"] is None
    # --input-size alone: the channels come from the graph.
    assert cli.main([*args, "--out", str(tmp_path / "c"), "--input-size", str(H),
                     str(W)]) == 0
    assert f"specialised to 1×{IN}×{H}×{W}" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "report.json").read_text())["guided"] is None
    assert cli.main([*args, "--out", str(tmp_path / "d"), "--input-size", str(H), str(W),
                     "--channels", "3"]) == 2
    assert "has shape [?, 2, ?, ?], not [1, 3, 5, 4]" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "e"), "--channels", str(IN)]) == 2
    assert "give --input-size H W" in capsys.readouterr().err


def test_load_model_specialises_to_model_toml(tmp_path: Path) -> None:
    folder = tmp_path / "dynamo"
    folder.mkdir()
    onnx.save(dynamo(channels=3), folder / "model.onnx")
    (folder / "model.toml").write_text(
        'labels = ["a", "b", "c"]\n[input]\n'
        f"size = [{H}, {W}]\nchannels = 3\n"
        '[output]\nactivation = "sigmoid"\n'
        f'[explain]\ntarget_layer = "{TARGET}"\n', encoding="utf-8")
    loaded = load_model(folder, providers=["CPUExecutionProvider"], threads=1, head_batch=16)
    assert loaded.engine.max_batch == 16
    assert _reshape_targets(loaded.engine.compiled.head) == {"flat": [0, C]}


def test_batch_axes_named_anew_along_the_graph_become_one() -> None:
    """tf2onnx declares intermediate shapes with fresh symbolic names per tensor."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__1", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["unk__1", 3, 4, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], value_info=[
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["unk__5", 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = specialise(model, (1, 3, 4, 4))
    batches = {vi.type.tensor_type.shape.dim[0].dim_param
               for vi in [*out.graph.input, *out.graph.value_info, *out.graph.output]}
    assert batches == {"unk__1"}
    data = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(ReferenceEvaluator(out).run(None, {"x": data})[0],
                                  ReferenceEvaluator(model).run(None, {"x": data})[0])


# --- dynamo's as_strided: a Gather from a flattened batch at indices computed from it ------

P = C * H * W  # elements of one image's target map


def _view(kind: str) -> np.ndarray:
    """One image's flat offsets of ``TARGET.as_strided(size, stride)``."""
    c, y, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    if kind == "contiguous":  # size (C, H, W), its own strides: ConvNeXt's head
        return (c * H * W + y * W + x).astype(np.int64)
    # Overlapping windows of two rows, size (C, H − 1, 2W), stride (HW, W, 1): each
    # element but the first and last rows' is read twice.
    c, y, x = np.meshgrid(np.arange(C), np.arange(H - 1), np.arange(2 * W), indexing="ij")
    return (c * H * W + y * W + x).astype(np.int64)


def as_strided(kind: str = "contiguous", dtype: type = np.float32, channels: int = IN,
               reversed_batch: bool = False) -> onnx.ModelProto:
    """The head of timm's ConvNeXt as torch's dynamo exporter writes ``as_strided``:
    Reshape(x, [-1]) → Gather at Range(0, N)·P + offsets, N the image's batch size, then a
    1×1 conv → GAP → Gemm. ``reversed_batch``: image b reads image N − 1 − b instead, which
    is no per-image Gather and must stay as it is."""
    g = _Graph(6, dtype, channels)
    g.node("Relu", ["conv"], [TARGET])
    g.node("Reshape", [TARGET, g.const("minus_one", _ints(-1))], ["flattened"])
    g.node("Shape", ["image"], ["batch1"], start=0, end=1)
    g.node("Squeeze", ["batch1"], ["batch"])
    g.node("Range", [g.const("zero", _scalar(0)), "batch", g.const("one", _scalar(1))],
           ["images"])
    if reversed_batch:
        g.node("Sub", ["batch", "one"], ["last"])
        g.node("Sub", ["last", "images"], ["which"])
    else:
        g.node("Identity", ["images"], ["which"])
    g.node("Mul", ["which", g.const("per_image", _scalar(P))], ["starts"])
    g.node("Unsqueeze", ["starts", g.const("axes", _ints(1, 2, 3))], ["starts4"])
    offsets = _view(kind)[None]
    g.node("Add", ["starts4", g.const("offsets", offsets)], ["positions"])
    g.node("Gather", ["flattened", "positions"], ["strided"], axis=0)
    g.node("Conv", ["strided", g.weight("mix_w", C, C, 1, 1)], ["mixed"])
    g.node("Relu", ["mixed"], ["mixed_relu"])
    g.head("mixed_relu")
    # Positive weights over rectified features: every class has positive contributions
    # for CNN Fixations to trace back.
    g.inits["fc_w"] = np.abs(g.inits["fc_w"])
    return g.model(["N", channels, H, W], ["N", K], opset=20)


STRIDED = ["contiguous", "windows"]


@pytest.mark.parametrize("kind", STRIDED)
def test_as_strided_becomes_a_per_image_gather_with_constant_indices(
        kind: str, rng: np.random.Generator) -> None:
    model = as_strided(kind)
    before = model.SerializeToString()
    special = specialise(model, SHAPE)
    assert model.SerializeToString() == before
    onnx.checker.check_model(special, full_check=True)
    ops = Counter(n.op_type for n in special.graph.node)
    assert not ops["Shape"] and not ops["Range"] and not ops["Squeeze"]
    index = GraphIndex(special)
    assert "flattened" not in index.producer, "the flattened batch is gone"
    node = index.producer["strided"]
    if kind == "contiguous":  # the image's elements in order: a reshape of it
        assert (node.name, node.op_type, list(node.input[:1])) == ("strided", "Reshape",
                                                                   [TARGET])
        assert index.constant(node.input[1]).tolist() == [-1, C, H, W]  # type: ignore[union-attr]
    else:  # one image's row of the target, then the same offsets in it
        assert (node.name, node.op_type, helper.get_attribute_value(node.attribute[0])) == (
            "strided", "Gather", 1)
        np.testing.assert_array_equal(index.constant(node.input[1]), _view(kind))  # type: ignore[arg-type]
        rows = index.producer[node.input[0]]
        assert rows.op_type == "Reshape" and list(rows.input[:1]) == [TARGET]
        assert index.constant(rows.input[1]).tolist() == [-1, P]  # type: ignore[union-attr]
    # Bit for bit the original graph's outputs, at the probe sizes and others.
    for batch in (1, 2, 3, 5):
        x = rng.normal(size=(batch, *SHAPE[1:])).astype(np.float32)
        np.testing.assert_array_equal(_run(special, x)[0], _run(model, x)[0])


def test_a_gather_reading_other_images_stays_computed(rng: np.random.Generator) -> None:
    """Image b reading image N − 1 − b: equal to a per-image Gather at one image, not at
    three; the indices stay computed at run time and so does the flattened batch."""
    model = as_strided(reversed_batch=True)
    special = specialise(model, SHAPE)
    index = GraphIndex(special)
    node = index.producer["strided"]
    assert node.op_type == "Gather" and list(node.input) == ["flattened", "positions"]
    assert not index.is_constant("positions")
    x = rng.normal(size=(3, *SHAPE[1:])).astype(np.float32)
    np.testing.assert_array_equal(_run(special, x)[0], _run(model, x)[0])
    assert "only constant indices" in str(_compile(model, input_shape=SHAPE).fixations_error)


@pytest.mark.parametrize("kind", STRIDED)
def test_as_strided_compiles_to_the_same_answers_and_unblocks_fixations(
        kind: str, rng: np.random.Generator) -> None:
    """Predict, Grad-CAM's head VJP and guided backprop give what they gave before the
    rewrite (through the run-time Gather's ScatterND), at one image and at three."""
    model = as_strided(kind)
    before = _compile(model)
    after = _compile(model, input_shape=SHAPE)
    assert after.split == before.split
    assert before.fixations is None and "Gather node 'strided': only constant indices" in str(
        before.fixations_error)
    assert after.fixations is not None and after.fixations_error is None
    assert before.guided is not None and after.guided is not None
    assert before.head_vjp is not None and after.head_vjp is not None
    old = Engine(before, ["CPUExecutionProvider"], 1, max_batch=8)
    new = Engine(after, ["CPUExecutionProvider"], 1, max_batch=8)
    for batch in (1, 3):
        x = rng.normal(size=(batch, *SHAPE[1:])).astype(np.float32)
        acts, logits = new.forward(x)
        want_acts, want_logits = old.forward(x)
        np.testing.assert_array_equal(acts, want_acts)
        np.testing.assert_array_equal(logits, want_logits)
        np.testing.assert_array_equal(new.head(acts), old.head(acts))
        seed = rng.normal(size=(batch, K)).astype(np.float32)
        np.testing.assert_array_equal(new.head_vjp(acts, seed), old.head_vjp(acts, seed))
        for got, want in zip(new.guided(x, seed), old.guided(x, seed), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", STRIDED)
def test_fixations_through_as_strided_walk_like_the_reference(
        kind: str, rng: np.random.Generator) -> None:
    """The walk of the specialised graph against the per-point reference walker on the
    exported graph itself (its run-time Gather moved on an iota): the same points on every
    tensor both graphs have, the flattened batch's at the per-image row's offsets."""
    model = as_strided(kind)
    compiled = _compile(model, input_shape=SHAPE)
    plan = compiled.fixations_plan
    assert plan is not None
    engine = Engine(compiled, ["CPUExecutionProvider"], 1)
    x = rng.normal(size=SHAPE).astype(np.float32)
    classes = list(range(K))
    traced = walk(plan, engine.all_activations(x).activations, classes, trace=True)
    full = _with_all_outputs(model)
    names = [o.name for o in full.graph.output]
    values = dict(zip(names, _run(full, x))) | {"image": x}
    reference = ReferenceWalker(model, values)
    rows = {"contiguous": set(), "windows": {"flattened/per_image"}}[kind]
    assert "flattened" not in traced and rows <= set(traced)
    for tag, cls in enumerate(classes):
        want = reference.walk("scores", cls)
        assert want["image"] and want["strided"], "the class traces back through the Gather"
        for tensor in (set(want) | set(traced)) - rows - {"flattened"}:
            assert _points(traced, tensor, tag) == want.get(tensor, set()), (cls, tensor)
        # Batch one: the flattened batch's positions are the row's.
        for row in rows:
            assert {(q,) for _, q in _points(traced, row, tag)} == want["flattened"]
