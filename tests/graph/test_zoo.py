"""Real CNN architectures (tests/data/zoo, made by tools/make_fixtures.py) against torch
autograd references computed in float64: target detection, forward pass, head VJP,
Grad-CAM and full-network plain and guided input gradients.

No torch here: the references are stored in the .npz files beside the models.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.graph.autodiff import SEED, grad_name, vjp
from service.graph.build import compile_model
from service.graph.onnx_graph import GraphIndex
from service.graph.target import find_logits, split
from service.methods import METHODS, rows
from service.models.activation import Activation
from service.models.spec import Layout
from service.runtime.engine import Engine
from service.runtime.sessions import make_session
from tests.graph.compare import load_npz, rel_err

ZOO = Path(__file__).resolve().parent.parent / "data" / "zoo"
MANIFEST: dict[str, dict[str, object]] = json.loads((ZOO / "manifest.json").read_text())
NAMES = list(MANIFEST)
TOL = 1e-4

by_name = pytest.mark.parametrize("name", NAMES, ids=NAMES)


@cache
def _model(name: str) -> onnx.ModelProto:
    return onnx.load(str(ZOO / str(MANIFEST[name]["onnx"])))


@cache
def _ref(name: str) -> dict[str, np.ndarray]:
    return load_npz(ZOO / str(MANIFEST[name]["npz"]))


@cache
def _engine(name: str) -> Engine:
    meta = MANIFEST[name]
    compiled = compile_model(_model(name), layout=Layout(str(meta["layout"])),
                             activation=str(meta["final_activation"]))
    return Engine(compiled, ["CPUExecutionProvider"], 1)


@by_name
def test_detects_target(name: str) -> None:
    meta = MANIFEST[name]
    cut = split(GraphIndex(_model(name)), layout=Layout(str(meta["layout"])))
    assert cut.target == meta["target"]
    assert list(cut.target_shape) == meta["target_shape"]
    assert cut.target_layout.value == meta["target_layout"]
    assert cut.logits == meta["logits_tensor"]
    assert cut.graph_activation == meta["final_activation"]


@by_name
def test_compiled_forward_matches_reference(name: str) -> None:
    engine, ref = _engine(name), _ref(name)
    assert engine.split.target == MANIFEST[name]["target"]
    acts, logits = engine.forward(ref["x"])
    assert rel_err(acts[0], ref["target"]) <= TOL
    assert rel_err(logits[0], ref["logits"]) <= TOL


@by_name
def test_head_vjp_matches_autograd(name: str) -> None:
    engine, ref = _engine(name), _ref(name)
    k = ref["logits"].shape[0]
    acts = np.broadcast_to(ref["target"].astype(np.float32), (k, *ref["target"].shape))
    grads = engine.head_vjp(np.ascontiguousarray(acts), np.eye(k, dtype=np.float32))
    err = rel_err(grads, ref["grad_target"])
    assert err <= TOL, f"{name}: head VJP relative error {err:.2e}"


@by_name
def test_gradcam_matches_autograd(name: str) -> None:
    engine, ref = _engine(name), _ref(name)
    captures = engine.capture(ref["x"], Activation(str(MANIFEST[name]["final_activation"])))
    k = ref["logits"].shape[0]
    maps = METHODS["gradcam"].compute(captures, rows(range(k)))
    assert [m.index for m in maps] == list(range(k))
    err = rel_err(np.stack([m.values for m in maps]), ref["gradcam"])
    assert err <= TOL, f"{name}: Grad-CAM relative error {err:.2e}"


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@by_name
def test_input_gradient_matches_autograd(name: str, guided: bool) -> None:
    model, ref = _model(name), _ref(name)
    index = GraphIndex(model)
    image = index.graph_inputs[0]
    _, logits, _ = find_logits(index)
    session = make_session(vjp(model, logits, [image], guided=guided),
                           ["CPUExecutionProvider"], 1)
    k = ref["logits"].shape[0]
    images = np.repeat(ref["x"], k, axis=0)
    (grads,) = session.run([grad_name(image)],
                           {image: images, SEED: np.eye(k, dtype=np.float32)})
    want = ref["guided_input" if guided else "grad_input"]
    err = rel_err(grads, want)
    assert err <= TOL, f"{name}: {'guided' if guided else 'plain'} input gradient error {err:.2e}"
