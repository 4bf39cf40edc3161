"""Guided Backpropagation and Guided Grad-CAM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import UnknownMethod
from service.methods.base import Captures, Method, RawMap, Target
from service.methods.gradcam import GradCam
from service.methods.maps import resize


def guided_maps(captures: Captures, classes: Sequence[int], target: Target) -> np.ndarray:
    """(K, H, W): guided d S_c / d image, summed over the image's channels."""
    if captures.guided is None:
        raise UnknownMethod("this model has no guided-backprop graph (see GET /models)")
    key = ("guided", tuple(classes), target)
    if key not in captures.memo:
        seeds = np.stack([captures.score_seed(c, target) for c in classes])
        captures.memo[key] = captures.guided(seeds).sum(axis=1)
    return captures.memo[key]  # type: ignore[return-value]


class GuidedBackprop(Method):
    """Guided backpropagation: the score's gradient w.r.t. the image, where every rectifier
    passes gradient only where its input was > 0 and the incoming gradient is > 0.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net", ICLR 2015
    workshop, https://arxiv.org/abs/1412.6806
    """

    name = "guided_backprop"
    paper = "https://arxiv.org/abs/1412.6806"
    grid = "model"
    needs_guided = True

    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        maps = guided_maps(captures, classes, target)
        return [RawMap(m.astype(np.float32), c, self.grid) for m, c in zip(maps, classes)]


class GuidedGradCam(Method):
    """Guided backprop ⊙ Grad-CAM upsampled (bilinear) to the input grid.

    Selvaraju et al., https://arxiv.org/abs/1610.02391, section 3.
    """

    name = "guided_gradcam"
    paper = "https://arxiv.org/abs/1610.02391"
    grid = "model"
    needs_head_vjp = True
    needs_guided = True

    def compute(self, captures: Captures, classes: Sequence[int],
                target: Target) -> list[RawMap]:
        maps = guided_maps(captures, classes, target)
        cams = GradCam().compute(captures, classes, target)
        h, w = maps.shape[1:]
        return [RawMap((g * resize(cam.values, h, w)).astype(np.float32), c, self.grid)
                for g, cam, c in zip(maps, cams, classes)]
