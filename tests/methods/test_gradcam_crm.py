"""Grad-CAM and CRM against straightforward references written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.graph.build import Capability, CompiledModel, compile_model
from service.methods import METHODS, Captures, Target, rows
from service.models.activation import Activation
from service.models.spec import Layout
from service.runtime.engine import Engine
from tests import handmade
from tests.handmade import NAMES, TARGET

ZOO = Path(__file__).resolve().parents[1] / "data" / "zoo"
ACTIVATION = {"linear": "none", "mlp": "sigmoid", "bn_softmax": "softmax", "nhwc": "sigmoid"}


def _probability(name: str, logits: np.ndarray) -> np.ndarray:
    if ACTIVATION[name] == "sigmoid":
        return 1 / (1 + np.exp(-logits))
    if ACTIVATION[name] == "softmax":
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return logits


def _captures(name: str, rng: np.random.Generator) -> tuple[Captures, handmade.Handmade]:
    h = handmade.build(name)
    engine = Engine(compile_model(h.model, layout=Layout(h.layout), target_layer=TARGET),
                    ["CPUExecutionProvider"], 1)
    shape = (1, 2, handmade.H, handmade.W) if h.layout == "NCHW" else (1, handmade.H,
                                                                        handmade.W, 2)
    return engine.capture(rng.normal(size=shape).astype(np.float32),
                          Activation(ACTIVATION[name])), h


def _score(name: str, h: handmade.Handmade, target: Target):  # type: ignore[no-untyped-def]
    def score(a: np.ndarray) -> np.ndarray:
        z = h.numpy_head(a)
        return _probability(name, z) if target is Target.PROBABILITY else z
    return score


@pytest.mark.parametrize("target", list(Target))
@pytest.mark.parametrize("name", NAMES)
def test_gradcam_equals_finite_difference_reference(name: str, target: Target,
                                                     rng: np.random.Generator) -> None:
    cap, h = _captures(name, rng)
    acts = cap.activations[0].astype(np.float64)
    score = _score(name, h, target)
    maps = METHODS["gradcam"].compute(cap, rows([0, 2], target))
    for raw, cls in zip(maps, [0, 2]):
        eps = 1e-6
        grad = np.zeros_like(acts)
        for i in np.ndindex(acts.shape):
            up, down = acts.copy(), acts.copy()
            up[i] += eps
            down[i] -= eps
            grad[i] = (score(up[None])[0, cls] - score(down[None])[0, cls]) / (2 * eps)
        alpha = grad.mean(axis=(1, 2))
        expected = np.maximum((alpha[:, None, None] * acts).sum(axis=0), 0)
        assert raw.index == cls
        scale = max(np.abs(expected).max(), 1e-12)
        assert np.abs(raw.values - expected).max() / scale <= 1e-4


def _brute_force_crm(score, acts: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(H, W, K): (S − S(l, m))², one masked copy at a time."""
    base = score(acts[None])[0]
    out = np.zeros((acts.shape[1], acts.shape[2], base.shape[0]))
    for l in range(acts.shape[1]):
        for m in range(acts.shape[2]):
            masked = acts.copy()
            masked[:, l, m] = 0.0
            out[l, m] = (base - score(masked[None])[0]) ** 2
    return out


@pytest.mark.parametrize("target", list(Target))
@pytest.mark.parametrize("name", NAMES)
def test_crm_equals_brute_force_reevaluation(name: str, target: Target,
                                             rng: np.random.Generator) -> None:
    cap, h = _captures(name, rng)
    expected = _brute_force_crm(_score(name, h, target), cap.activations[0].astype(np.float64))
    per_class = METHODS["crm"].compute(cap, rows([0, 1, 2], target))
    for raw in per_class:
        assert raw.index is not None
        ref = expected[..., raw.index]
        np.testing.assert_allclose(raw.values, ref, rtol=2e-3, atol=1e-6 * ref.max() + 1e-9)
    (combined,) = METHODS["crm_combined"].compute(cap, rows([None], target))
    assert combined.index is None
    ref = expected.sum(axis=-1)
    np.testing.assert_allclose(combined.values, ref, rtol=2e-3, atol=1e-6 * ref.max() + 1e-9)


def test_crm_of_a_linear_head_is_the_squared_cam(rng: np.random.Generator) -> None:
    # The paper's identity: with GAP → FC, (S_c − S_c(l,m))² = (Σ_k w_ck A_k(l,m) / HW)².
    cap, h = _captures("linear", rng)
    weights = next(i for i in h.model.graph.initializer if i.name == "fc_w")
    w = np.frombuffer(weights.raw_data, dtype=np.float32).reshape(handmade.K, handmade.C)
    acts = cap.activations[0].astype(np.float64)
    for raw in METHODS["crm"].compute(cap, rows([0, 1, 2], Target.LOGIT)):
        cam = np.einsum("k,khw->hw", w[raw.index], acts) / (handmade.H * handmade.W)
        np.testing.assert_allclose(raw.values, cam**2, rtol=2e-3, atol=1e-9)


def test_crm_of_a_nonlinear_head_is_not_the_seed_shortcut(rng: np.random.Generator) -> None:
    # The seed project squared a CAM built from the *last* Dense layer: for a hidden layer
    # that is not CRM. Our maps must follow the real head instead.
    cap, h = _captures("mlp", rng)
    (raw,) = METHODS["crm"].compute(cap, rows([0], Target.LOGIT))
    reference = _brute_force_crm(h.numpy_head, cap.activations[0].astype(np.float64))[..., 0]
    np.testing.assert_allclose(raw.values, reference, rtol=2e-3, atol=1e-9)
    w2 = next(i for i in h.model.graph.initializer if i.name == "w2")
    last = np.frombuffer(w2.raw_data, dtype=np.float32).reshape(handmade.K, 8)
    shortcut = np.einsum("k,khw->hw", last[0, : handmade.C], cap.activations[0]) ** 2
    corr = np.corrcoef(shortcut.ravel(), reference.ravel())[0, 1]
    assert corr < 0.99


@pytest.mark.parametrize("zoo", ["resnet", "densenet", "nhwc"])
def test_the_pooled_head_gives_the_maps_of_the_whole_head(zoo: str) -> None:
    """A real export's head from its spatial mean on gives the CRM maps the whole head gives
    on the H·W masked copies, and its VJP the Grad-CAM maps of the head's VJP on the
    activations (both compared with a compilation left without the pooled graphs)."""
    manifest = json.loads((ZOO / "manifest.json").read_text())[zoo]
    shape = (1, *manifest["input_shape"])
    layout = Layout(manifest.get("layout", "NCHW"))
    compiled = compile_model(onnx.load(ZOO / f"{zoo}.onnx"), layout=layout, input_shape=shape)
    pooled_caps = {Capability.POOLED_HEAD, Capability.POOLED_HEAD_VJP}
    assert pooled_caps <= set(compiled.graphs)
    whole = CompiledModel(compiled.split, {k: v for k, v in compiled.graphs.items()
                                           if k not in pooled_caps})
    image = np.random.default_rng(11).normal(size=shape).astype(np.float32)
    maps = {}
    for name, model in (("pooled", compiled), ("whole", whole)):
        engine = Engine(model, ["CPUExecutionProvider"], 1)
        cap = engine.capture(image, Activation("sigmoid"))
        assert cap.graphs.pooled is cap.graphs.pooled_vjp is (name == "pooled")
        every = rows(list(range(cap.logits.shape[1])))
        maps[name] = {"crm": [m.values for m in METHODS["crm"].compute(cap, every)],
                      "crm_combined": [METHODS["crm_combined"].compute(cap, rows([None]))[0]
                                       .values],
                      "gradcam": [m.values for m in METHODS["gradcam"].compute(cap, every)]}
    for method, pooled_maps in maps["pooled"].items():
        for pooled, reference in zip(pooled_maps, maps["whole"][method], strict=True):
            if method == "gradcam":  # equal here, or up to 2e-7 of the peak
                np.testing.assert_allclose(pooled, reference, rtol=0,
                                           atol=1e-6 * reference.max())
                continue
            assert reference.max() > 0
            # Both are float32 heads on nearly equal scores: 1e-6 to 5e-5 of the peak here.
            np.testing.assert_allclose(pooled, reference, rtol=0, atol=2e-4 * reference.max())
