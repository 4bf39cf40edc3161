"""Explanation-quality metrics against known finding masks (NumPy + OpenCV only).

Maps and masks share one grid (the model's input grid). Every metric reads the map's
magnitude |map|, as the service's PNGs and regions do, so signed gradient maps count by
strength.

- pointing game (Zhang et al., ECCV 2016, https://arxiv.org/abs/1608.00507): a hit when the
  map's maximum lies within ``tolerance`` px of the mask;
- energy fraction: the share of Σ|map| that falls inside the mask;
- box IoU: a region box against the mask's bounding box;
- deletion and insertion AUC (RISE, Petsiuk et al., BMVC 2018,
  https://arxiv.org/abs/1806.07421): pixels are moved, in order of decreasing |map|, from
  the image to a baseline (deletion) or from the baseline to the image (insertion), a
  fixed fraction per step; the area under the class-probability curve over the fraction
  moved (0..1) is in [0, 1]. Low deletion and high insertion AUC are good.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Box = tuple[int, int, int, int]


def pointing_hit(values: np.ndarray, mask: np.ndarray, tolerance: int) -> bool:
    """Whether argmax |values| lies in ``mask`` dilated by a disc of radius ``tolerance``."""
    y, x = np.unravel_index(int(np.argmax(np.abs(values))), values.shape)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)
    return bool(cv2.dilate(mask.astype(np.uint8), kernel)[y, x])


def energy_fraction(values: np.ndarray, mask: np.ndarray) -> float:
    """Σ|values| inside ``mask`` / Σ|values| (0 for an all-zero map)."""
    magnitude = np.abs(values.astype(np.float64))
    total = float(magnitude.sum())
    return float(magnitude[mask].sum()) / total if total > 0 else 0.0


def mask_box(mask: np.ndarray) -> Box:
    """The bounding box [x0, y0, x1, y1] (x1, y1 exclusive) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (exclusive ends)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def removal_order(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices by decreasing |values|; ties (e.g. a CAM's zero plateau) in random
    order, so no raster order leaks into the curves."""
    flat = np.abs(values.astype(np.float64)).ravel()
    return np.lexsort((rng.permutation(flat.size), -flat))


def perturbed(image: np.ndarray, baseline: np.ndarray, order: np.ndarray,
              steps: int) -> np.ndarray:
    """(2·(steps + 1), H, W): the deletion images, then the insertion images.

    Image k of each half has the first round(k / steps · N) pixels of ``order`` moved:
    to ``baseline`` (deletion) or from it (insertion).
    """
    n = image.size
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    counts = np.round(np.linspace(0, n, steps + 1)).astype(np.int64)
    moved = (rank[None, :] < counts[:, None]).reshape(steps + 1, *image.shape)
    deletion = np.where(moved, baseline[None], image[None])
    insertion = np.where(moved, image[None], baseline[None])
    return np.concatenate([deletion, insertion]).astype(np.float32)


def auc(curve: np.ndarray) -> np.ndarray:
    """Trapezoid area of curves sampled at equal steps over [0, 1] along axis 0."""
    return np.asarray(np.trapezoid(curve, dx=1.0 / (len(curve) - 1), axis=0))


def deletion_insertion(image: np.ndarray, baseline: np.ndarray, values: np.ndarray,
                       predict: Callable[[np.ndarray], np.ndarray], steps: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC for every class ``predict`` scores, in one batched call.

    Args:
        image, baseline: (H, W) on the map's grid.
        values: the map, (H, W).
        predict: a batch of images (B, H, W) → probabilities (B, K).
        steps: how many equal steps move all pixels (50: 2 % of the pixels per step).
        rng: breaks ties in the order.

    Returns:
        (deletion AUC (K,), insertion AUC (K,)).
    """
    probs = predict(perturbed(image, baseline, removal_order(values, rng), steps))
    return auc(probs[:steps + 1]), auc(probs[steps + 1:])
