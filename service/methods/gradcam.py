"""Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import UnknownMethod
from service.methods.base import Captures, Method, RawMap, Target


class GradCam(Method):
    """Gradient-weighted class activation mapping.

    α_k = mean over (i, j) of ∂S_c/∂A_k(i, j); map = ReLU(Σ_k α_k A_k). All requested
    classes go through the head's vector-Jacobian product in one batched run.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017, https://arxiv.org/abs/1610.02391
    """

    name = "gradcam"
    paper = "https://arxiv.org/abs/1610.02391"
    needs_head_vjp = True

    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        if captures.head_vjp is None:
            raise UnknownMethod("this model has no head VJP graph (see GET /models)")
        acts = captures.activations
        seeds = np.stack([captures.score_seed(c, target) for c in classes])
        copies = np.broadcast_to(acts, (len(classes), *acts.shape))
        grads = captures.head_vjp(copies, seeds)
        weights = grads.mean(axis=(2, 3), dtype=np.float64)
        maps = np.maximum(np.einsum("kc,chw->khw", weights, acts.astype(np.float64)), 0.0)
        return [RawMap(m.astype(np.float32), c, self.grid) for m, c in zip(maps, classes)]
