"""Boxes around the regions a map highlights."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_REGIONS = 10


@dataclass(frozen=True)
class Region:
    """A box [x0, y0, x1, y1] in original-image pixels (x1, y1 exclusive) and its peak."""

    box: tuple[int, int, int, int]
    score: float


def regions(normalised: np.ndarray, threshold: float, scale_x: float,
            scale_y: float) -> list[Region]:
    """Connected components (8-connected) of ``normalised > threshold``, largest peak first.

    Args:
        normalised: a map scaled to [0, 1] on some grid.
        threshold: the cut on the normalised map.
        scale_x, scale_y: original-image pixels per grid pixel.
    """
    mask = (normalised > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    found: list[Region] = []
    for label in range(1, count):
        x, y, w, h = (int(v) for v in stats[label, :4])
        peak = float(normalised[labels == label].max())
        box = (
            int(np.floor(x * scale_x)),
            int(np.floor(y * scale_y)),
            int(np.ceil((x + w) * scale_x)),
            int(np.ceil((y + h) * scale_y)),
        )
        found.append(Region(box, round(peak, 4)))
    found.sort(key=lambda r: -r.score)
    return found[:MAX_REGIONS]
