"""Tiny timm vision transformers (tests/data/vit, made by tools/make_vit_fixtures.py: ViT,
DeiT-distilled, ViT with register tokens, Swin), both torch exporters, against torch
float64 references: the token-grid target, the forward pass, the head VJP, Grad-CAM
(pytorch-grad-cam's reshape_transform way) and CRM (the rest of the network re-run with
each patch token zeroed).

No torch here: the references are stored in the .npz files beside the models.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper

from service.config import Settings
from service.errors import CompileError
from service.graph.build import Capability, CompiledModel, compile_model
from service.graph.cache import CompileCache
from service.graph.onnx_graph import GraphIndex
from service.graph.specialise import specialise
from service.graph.target import split
from service.graph.tokens import GRID, PREFIX
from service.imaging import decode
from service.imaging.preprocess import to_model_input
from service.main import create_app
from service.methods import METHODS, rows
from service.models.activation import Activation
from service.models.repository import load_model
from service.models.spec import Layout
from service.runtime.engine import Engine

DATA = Path(__file__).resolve().parent.parent / "data"
VIT = DATA / "vit"
MANIFEST: dict[str, dict[str, object]] = json.loads((VIT / "manifest.json").read_text())
NAMES = list(MANIFEST)
# The ViTs (their target a token grid); Swin's tokens are 4-D (B, h, w, C) all along.
VITS = [n for n in NAMES if MANIFEST[n]["prefix_tokens"]]
TOL = 1e-4
NONE = Activation("none")

by_name = pytest.mark.parametrize("name", NAMES, ids=NAMES)
by_vit = pytest.mark.parametrize("name", VITS, ids=VITS)


def _shape(name: str) -> list[int]:
    return [1, *MANIFEST[name]["input_shape"]]  # type: ignore[misc]


@cache
def _model(name: str) -> onnx.ModelProto:
    return onnx.load(str(VIT / str(MANIFEST[name]["onnx"])))


@cache
def _ref(name: str) -> dict[str, np.ndarray]:
    with np.load(VIT / str(MANIFEST[name]["npz"])) as data:
        return dict(data)


@cache
def _compiled(name: str) -> CompiledModel:
    return compile_model(_model(name), activation="none", input_shape=_shape(name))


@cache
def _engine(name: str) -> Engine:
    return Engine(_compiled(name), ["CPUExecutionProvider"], 1)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| over the whole array."""
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@by_vit
def test_target_is_the_token_grid(name: str) -> None:
    meta, cut = MANIFEST[name], _compiled(name).split
    h, w = meta["grid"]  # type: ignore[misc]
    assert cut.target == GRID
    assert cut.target_layout is Layout.NCHW
    assert cut.target_shape == (meta["channels"], h, w)
    assert cut.prefix_tokens == meta["prefix_tokens"]
    assert cut.context == PREFIX
    # The tokens entering the last block: the LayerNormalization reading them belongs to
    # the last attention block of the two (the exporters name it after blocks.1 / norm_2).
    index = GraphIndex(specialise(_model(name), _shape(name)))
    norms = [n for n in index.consumers[str(cut.tokens)] if n.op_type == "LayerNormalization"]
    assert len(norms) == 1
    order = [n.name for n in index.graph.node if n.op_type == "LayerNormalization"]
    assert order.index(norms[0].name) == 2, order  # norm1, norm2 of block 0, then block 1


@pytest.mark.parametrize("name", ["swin-legacy", "swin-dynamo"])
def test_swin_target_is_its_final_norm(name: str) -> None:
    """Swin keeps its tokens as (B, h, w, C): the CNN rule finds them, NHWC, and no token
    grid is cut (pytorch-grad-cam's Swin recipe only moves the channels first)."""
    cut = _compiled(name).split
    h, w = MANIFEST[name]["grid"]  # type: ignore[misc]
    assert (cut.tokens, cut.prefix_tokens, cut.context) == (None, 0, None)
    assert cut.target_layout is Layout.NHWC
    assert cut.target_shape == (MANIFEST[name]["channels"], h, w)
    index = GraphIndex(specialise(_model(name), _shape(name)))
    assert index.producer[cut.target].op_type == "LayerNormalization"


@by_name
def test_forward_matches_reference(name: str) -> None:
    ref = _ref(name)
    acts, logits, context = _engine(name).forward_context(ref["x"])
    assert _rel(acts[0], ref["target"]) <= TOL
    assert _rel(logits[0], ref["logits"]) <= TOL
    if "prefix" in ref:
        assert context is not None
        assert _rel(context[0], ref["prefix"]) <= TOL
    else:
        assert context is None


@by_name
def test_head_vjp_matches_autograd(name: str) -> None:
    engine, ref = _engine(name), _ref(name)
    k = ref["logits"].shape[0]
    acts = np.repeat(ref["target"][None].astype(np.float32), k, axis=0)
    context = (np.repeat(ref["prefix"][None].astype(np.float32), k, axis=0)
               if "prefix" in ref else None)
    grads = engine.head_vjp(acts, np.eye(k, dtype=np.float32), context)
    err = _rel(grads, ref["grad_target"])
    assert err <= TOL, f"{name}: head VJP relative error {err:.2e}"


@pytest.mark.parametrize("method", ["gradcam", "crm"])
@by_name
def test_class_maps_match_torch(name: str, method: str) -> None:
    ref = _ref(name)
    captures = _engine(name).capture(ref["x"], NONE)
    k = ref["logits"].shape[0]
    maps = METHODS[method].compute(captures, rows(range(k)))
    assert [m.index for m in maps] == list(range(k))
    err = _rel(np.stack([m.values for m in maps]), ref[method])
    assert err <= TOL, f"{name}: {method} relative error {err:.2e}"


@by_name
def test_crm_combined_matches_torch(name: str) -> None:
    ref = _ref(name)
    (got,) = METHODS["crm_combined"].compute(_engine(name).capture(ref["x"], NONE), rows([None]))
    err = _rel(got.values, ref["crm_combined"])
    assert err <= TOL, f"{name}: crm_combined relative error {err:.2e}"


@pytest.mark.parametrize("name", ["vit_reg-dynamo", "deit_dist-legacy"])
def test_batch_mates_keep_their_own_prefix_tokens(name: str) -> None:
    """Each row's head reads its own image's prefix tokens: the reference image second in a
    batch gets the reference maps."""
    ref = _ref(name)
    other = np.ascontiguousarray(ref["x"][..., ::-1, :]) * np.float32(0.5)
    captures = _engine(name).capture(np.concatenate([other, ref["x"]]), NONE)
    k = ref["logits"].shape[0]
    for method in ("gradcam", "crm"):
        maps = METHODS[method].compute(captures, rows(range(k), image=1))
        err = _rel(np.stack([m.values for m in maps]), ref[method])
        assert err <= TOL, f"{name}: {method} of the batch's second image: {err:.2e}"
        first = METHODS[method].compute(captures, rows(range(k), image=0))
        assert _rel(np.stack([m.values for m in first]), ref[method]) > 0.05


def test_guided_and_fixations_are_unavailable_with_reasons() -> None:
    compiled = _compiled("vit-legacy")
    missing = compiled.missing(METHODS["guided_backprop"].requires)
    assert "rectifier" in missing[Capability.GUIDED] and "GELU" in missing[Capability.GUIDED]
    assert compiled.missing(METHODS["guided_gradcam"].requires) == missing
    assert "MatMul" in compiled.missing(METHODS["fixations"].requires)[Capability.FIXATIONS]
    for method in ("gradcam", "crm", "crm_combined"):
        assert compiled.missing(METHODS[method].requires) == {}


@pytest.mark.parametrize("name", ["vit-dynamo", "vit_reg-legacy"])
def test_named_token_tensor_is_the_same_target(name: str) -> None:
    detected = _compiled(name).split
    named = compile_model(_model(name), activation="none", input_shape=_shape(name),
                          target_layer=detected.tokens).split
    assert named == detected


def test_a_token_tensor_that_is_no_cut_is_refused() -> None:
    name = "vit-legacy"
    tokens = str(_compiled(name).split.tokens)
    index = GraphIndex(specialise(_model(name), _shape(name)))
    (norm1,) = [n for n in index.consumers[tokens] if n.op_type == "LayerNormalization"]
    with pytest.raises(CompileError, match="is not a token tensor"):
        compile_model(_model(name), activation="none", input_shape=_shape(name),
                      target_layer=norm1.output[0])


def test_compile_cache_keeps_the_token_grid(tmp_path: Path) -> None:
    name = "deit_dist-dynamo"
    raw = (VIT / str(MANIFEST[name]["onnx"])).read_bytes()
    options = {"layout": Layout.NCHW, "activation": "none", "target_layer": None,
               "input_shape": _shape(name)}
    CompileCache(tmp_path).compile(raw, _model(name), **options)  # type: ignore[arg-type]
    again = CompileCache(tmp_path).compile(raw, _model(name), **options)  # type: ignore[arg-type]
    assert again.split == _compiled(name).split
    ref = _ref(name)
    maps = METHODS["gradcam"].compute(Engine(again, ["CPUExecutionProvider"], 1).capture(
        ref["x"], NONE), rows([0]))
    assert _rel(maps[0].values, ref["gradcam"][0]) <= TOL


def test_served_over_http(tmp_path: Path) -> None:
    """A ViT model folder served by the app: /models tells the token tensor and why the
    guided methods are missing; /explain's feature-grid maps are the engine's on the same
    network input, and guided backprop is refused with the reason."""
    name = "deit_dist-dynamo"
    folder = tmp_path / "deit"
    folder.mkdir()
    shutil.copy(VIT / str(MANIFEST[name]["onnx"]), folder / "model.onnx")
    (folder / "model.toml").write_text(
        'labels = ["a", "b", "c"]\n[input]\nsize = [32, 32]\nchannels = 3\n'
        'mean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n[output]\nactivation = "sigmoid"\n')
    image = (DATA / "phantoms" / "nodule.png").read_bytes()
    png = {"content-type": "image/png"}
    with TestClient(create_app(Settings(models=tmp_path, threads=1))) as client:
        info = client.get("/models/deit").json()
        assert info["target_layer"] == {"name": _compiled(name).split.tokens,
                                        "shape": [32, 4, 4], "detected": True}
        assert info["methods"] == ["crm", "crm_combined", "gradcam"]
        reasons = info["unavailable_methods"]
        assert set(reasons) == {"guided_backprop", "guided_gradcam", "fixations",
                                "fixations_summed"}
        assert "GELU, which is not a rectifier" in reasons["guided_backprop"]

        r = client.post("/explain", params={"methods": "gradcam,crm,crm_combined",
                                            "classes": "a,c", "heatmap": "npy",
                                            "size": "feature"}, content=image, headers=png)
        assert r.status_code == 200, r.text
        got = {(m["method"], m["label"]): np.load(io.BytesIO(base64.b64decode(
            m["heatmap"]["data"])), allow_pickle=False) for m in r.json()["explanations"]}

        refused = client.post("/explain", params={"methods": "guided_backprop"},
                              content=image, headers=png)
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_method"
        assert "rectifier" in refused.json()["detail"]

    loaded = load_model(folder, providers=["CPUExecutionProvider"], threads=1, head_batch=64)
    x = to_model_input(decode(image, "image/png"), loaded.config.input).tensor
    captures = loaded.engine.capture(x, loaded.config.activation)
    assert set(got) == {("gradcam", "a"), ("gradcam", "c"), ("crm", "a"), ("crm", "c"),
                        ("crm_combined", None)}
    for (method, label), values in got.items():
        cls = None if label is None else "abc".index(label)
        (want,) = METHODS[method].compute(captures, rows([cls]))
        assert values.shape == (4, 4) and values.max() > 0
        np.testing.assert_allclose(values, want.values, rtol=1e-5, atol=1e-7 * want.values.max())


def test_a_cnn_flatten_is_not_a_token_tensor() -> None:
    """Conv → (B, 20, 4·4) → X·Xᵀ → mean → Gemm: 20 = 4·4 + 4 "tokens", and a MatMul of two
    image-dependent tensors, but rows of width 16, not the grid's 20 channels: the target
    stays the Conv's output."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in (
        ("w", rng.standard_normal((20, 3, 2, 2))), ("fc", rng.standard_normal((20, 3))))]
    inits.append(numpy_helper.from_array(np.array([-1, 20, 16], np.int64), "shape"))
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["a"], strides=[2, 2]),
        helper.make_node("Reshape", ["a", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["flat", "flat_t"], ["gram"]),
        helper.make_node("ReduceMean", ["gram", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "flatten", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                         ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    cut = split(GraphIndex(model), layout=Layout.NCHW)
    assert (cut.target, cut.target_shape, cut.tokens) == ("a", (20, 4, 4), None)
