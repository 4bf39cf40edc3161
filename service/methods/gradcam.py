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
        _, _, h, w = captures.activations.shape
        if captures.graphs.pooled_vjp:
            means = captures.activations.mean(axis=(2, 3), dtype=np.float64)[images]
            grads = captures.graphs.pooled_head_vjp(means, captures.seeds(todo))
            weights = grads.astype(np.float64) / (h * w)
        else:
            grads = captures.graphs.head_vjp(captures.activations[images],
                                             captures.seeds(todo), images)
            weights = grads.mean(axis=(2, 3), dtype=np.float64)
        # Σ_k α_k A_k per image, one product for all of its rows.
        for image in dict.fromkeys(images):
            mine = [k for k, i in enumerate(images) if i == image]
            acts = captures.activations[image].astype(np.float64).reshape(-1, h * w)
            maps = np.maximum(weights[mine] @ acts, 0.0).reshape(len(mine), h, w)
            for k, values in zip(mine, maps):
                captures.memo["gradcam", todo[k]] = values.astype(np.float32)
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
