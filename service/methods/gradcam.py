"""Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.graph.build import Capability
from service.methods.base import Captures, Method, Row


def gradcam_maps(captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
    """ReLU(Σ_k α_k A_k) per row; every new row of the batch in one head-VJP run.

    A head that reads the activations only through their spatial mean has the same
    gradient ∂S/∂mean_k / HW at every (i, j) of channel k, so α comes from the pooled
    head's VJP on one mean vector per row, not from the head's on a copy of A per row.
    """
    todo = captures.missing("gradcam", rows)
    if todo:
        images = [r.image for r in todo]
        acts = captures.activations[images]
        if captures.graphs.pooled_vjp:
            means = acts.mean(axis=(2, 3), dtype=np.float64)
            grads = captures.graphs.pooled_head_vjp(means, captures.seeds(todo))
            weights = grads.astype(np.float64) / (acts.shape[2] * acts.shape[3])
        else:
            grads = captures.graphs.head_vjp(acts, captures.seeds(todo), images)
            weights = grads.mean(axis=(2, 3), dtype=np.float64)
        maps = np.maximum(np.einsum("rc,rchw->rhw", weights, acts.astype(np.float64)), 0.0)
        for row, values in zip(todo, maps):
            captures.memo["gradcam", row] = values.astype(np.float32)
    return [captures.memo["gradcam", r] for r in rows]  # type: ignore[misc]


class GradCam(Method):
    """Gradient-weighted class activation mapping.

    α_k = mean over (i, j) of ∂S_c/∂A_k(i, j); map = ReLU(Σ_k α_k A_k). All rows of a batch
    (every requested class of every image) go through the head's vector-Jacobian product
    in one batched run (the pooled head's, where the head begins with the spatial mean).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017, https://arxiv.org/abs/1610.02391
    """

    name = "gradcam"
    paper = "https://arxiv.org/abs/1610.02391"
    requires = frozenset({Capability.HEAD_VJP})

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        return gradcam_maps(captures, rows)
