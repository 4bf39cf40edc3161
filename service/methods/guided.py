"""Guided Backpropagation and Guided Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.graph.build import Capability
from service.methods.base import Captures, Method, Row
from service.methods.gradcam import gradcam_maps
from service.methods.maps import resize


def guided_maps(captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
    """(H, W) per row: guided d S_c / d image, summed over the image's channels; the rows
    not computed yet (with the forward pass, or by the other guided method) in one run."""
    todo = captures.missing("guided", rows)
    if todo:
        grads = captures.graphs.guided([r.image for r in todo], captures.seeds(todo))
        for row, values in zip(todo, grads.sum(axis=1)):
            captures.memo["guided", row] = values
    return [captures.memo["guided", r] for r in rows]  # type: ignore[misc]


class GuidedBackprop(Method):
    """Guided backpropagation: the score's gradient w.r.t. the image, where every rectifier
    passes gradient only where its input was > 0 and the incoming gradient is > 0.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR 2015
    workshop, https://arxiv.org/abs/1412.6806
    """

    name = "guided_backprop"
    paper = "https://arxiv.org/abs/1412.6806"
    grid = "model"
    requires = frozenset({Capability.GUIDED})

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        return guided_maps(captures, rows)


class GuidedGradCam(Method):
    """Guided backprop ⊙ Grad-CAM upsampled (bilinear) to the input grid.

    Selvaraju et al., https://arxiv.org/abs/1610.02391, section 3.
    """

    name = "guided_gradcam"
    paper = "https://arxiv.org/abs/1610.02391"
    grid = "model"
    requires = frozenset({Capability.HEAD_VJP, Capability.GUIDED})

    def maps(self, captures: Captures, rows: Sequence[Row]) -> list[np.ndarray]:
        guided = guided_maps(captures, rows)
        cams = gradcam_maps(captures, rows)
        return [g * resize(cam, *g.shape) for g, cam in zip(guided, cams)]
