"""Guided backprop and Guided Grad-CAM against a NumPy guided backward written here."""

from __future__ import annotations

import numpy as np
import pytest

from service.graph.build import compile_model
from service.methods import METHODS, Target, rows
from service.methods.maps import resize
from service.models.activation import Activation
from service.models.spec import InputSpec
from service.runtime.engine import Engine
from tests import handmade
from tests.handmade import TARGET, H, K, W


def _weights(model, *names: str) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    return [inits[n] for n in names]


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3×3 convolution, pad 1, stride 1: (Cin, H, W) → (Cout, H, W), by loops."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    out = np.zeros((w.shape[0], x.shape[1], x.shape[2]))
    for o in range(w.shape[0]):
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                out[o, i, j] = (padded[:, i:i + 3, j:j + 3] * w[o]).sum() + b[o]
    return out


def _conv_input_grad(g: np.ndarray, w: np.ndarray, cin: int) -> np.ndarray:
    """The transpose of ``_conv`` applied to g: d<g, conv(x)>/dx."""
    grad = np.zeros((cin, g.shape[1] + 2, g.shape[2] + 2))
    for o in range(g.shape[0]):
        for i in range(g.shape[1]):
            for j in range(g.shape[2]):
                grad[:, i:i + 3, j:j + 3] += g[o, i, j] * w[o]
    return grad[:, 1:-1, 1:-1]


def _reference(name: str, image: np.ndarray, cls: int) -> np.ndarray:
    """Guided ∂logit_cls/∂image, (2, H, W), for the 'linear' and 'mlp' handmade models."""
    model = handmade.build(name).model
    conv_w, conv_b = _weights(model, "conv_w", "conv_b")
    pre = _conv(image, conv_w, conv_b)
    acts = np.maximum(pre, 0)
    if name == "linear":
        (fc_w,) = _weights(model, "fc_w")
        g_pooled = fc_w[cls]
    else:
        w1, b1, w2 = _weights(model, "w1", "b1", "w2")
        hidden = acts.mean(axis=(1, 2)) @ w1.T + b1
        g_hidden = np.maximum(w2[cls], 0) * (hidden > 0)  # guided at the head's ReLU
        g_pooled = g_hidden @ w1
    g_acts = np.broadcast_to(g_pooled[:, None, None] / (H * W), acts.shape)
    g_pre = np.maximum(g_acts, 0) * (pre > 0)  # guided at the backbone's ReLU
    return _conv_input_grad(g_pre, conv_w, image.shape[0])


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_guided_backprop_equals_numpy_reference(name: str, rng: np.random.Generator) -> None:
    h = handmade.build(name)
    engine = Engine(compile_model(h.model, target_layer=TARGET), ["CPUExecutionProvider"], 1)
    nonzero = 0
    for _ in range(4):
        image = rng.normal(size=(1, 2, H, W)).astype(np.float32)
        acts, logits, grads = engine.guided(image, np.eye(K, dtype=np.float32))
        plain_acts, plain_logits = engine.forward(image)
        for row in range(K):  # every seed row's forward pass is the image's
            np.testing.assert_allclose(acts[row:row + 1], plain_acts, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(logits[row:row + 1], plain_logits, rtol=1e-6, atol=1e-6)
        for cls in range(K):
            expected = _reference(name, image[0].astype(np.float64), cls)
            scale = np.abs(expected).max()
            nonzero += scale > 0
            assert np.abs(grads[cls] - expected).max() <= 1e-5 * max(scale, 1e-3)
    assert nonzero >= 4  # the guided rule zeroes some classes entirely; not all of them


def test_guided_methods(rng: np.random.Generator) -> None:
    h = handmade.build("mlp")
    engine = Engine(compile_model(h.model, target_layer=TARGET), ["CPUExecutionProvider"], 1)
    image = rng.normal(size=(1, 2, H, W)).astype(np.float32)
    std = np.array([0.5, 0.25], np.float32)
    cap = engine.capture(image, Activation.SIGMOID, InputSpec(H, W, 2, (0.0, 0.0), tuple(std)))
    logits = cap.logits
    guided = METHODS["guided_backprop"].compute(cap, rows([0, 2], Target.LOGIT))
    gradcam = METHODS["gradcam"].compute(cap, rows([0, 2], Target.LOGIT))
    fused = METHODS["guided_gradcam"].compute(cap, rows([0, 2], Target.LOGIT))
    for g, cam, f, cls in zip(guided, gradcam, fused, [0, 2]):
        ref = _reference("mlp", image[0].astype(np.float64), cls)
        expected = (ref / std[:, None, None]).sum(axis=0)  # d/d(image before normalisation)
        assert g.grid == "model" and g.index == cls
        np.testing.assert_allclose(g.values, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        np.testing.assert_allclose(f.values, g.values * resize(cam.values, H, W), rtol=1e-6)
    # probability target: the guided seed is scaled by p(1 − p) before the rectifiers, so the
    # map scales by the same positive factor.
    p = 1 / (1 + np.exp(-logits[0, 0]))
    (prob,) = METHODS["guided_backprop"].compute(cap, rows([0], Target.PROBABILITY))
    np.testing.assert_allclose(prob.values, guided[0].values * p * (1 - p), rtol=1e-4,
                               atol=1e-7)
