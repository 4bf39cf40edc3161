"""Boxes around the regions a map highlights."""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from service.methods.base import RawMap
from service.methods.maps import normalise, resize, smooth

MAX_REGIONS = 10
_EDGE = 1e-9  # see regions(); maps.js uses the same


@dataclass(frozen=True)
class Region:
    """A box [x0, y0, x1, y1] in original-image pixels (x1, y1 exclusive), its peak, and
    its outline.

    ``outline`` is (N, 2) points (x, y) in original-image pixel coordinates with (0, 0) the
    top-left corner of the top-left pixel (DICOM's, PS3.3 C.18.6.1.1): the centres of the
    region's boundary cells on the grid it was found on, in order around it (the last
    joins the first), N ≥ 1; taken back to that grid (÷ scale − 0.5), cv2.fillPoly of
    them gives back the region's cells, holes filled. None for a region made by hand.
    """

    box: tuple[int, int, int, int]
    score: float
    outline: np.ndarray | None = field(default=None, compare=False, repr=False)


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
    peaks = [float(normalised[labels == label].max()) for label in range(1, count)]
    # Largest peak first (a stable sort: ties in OpenCV's raster order); only the regions
    # kept get an outline.
    kept = sorted(range(1, count), key=lambda label: -round(peaks[label - 1], 4))
    found: list[Region] = []
    for label in kept[:MAX_REGIONS]:
        x, y, w, h = (int(v) for v in stats[label, :4])
        # An edge that lands on a whole pixel may miss it by a rounding error (224 cells
        # of 29 / 224 pixels end at 29.000000000000004): ceil would give 30, a pixel
        # outside a 29-pixel image. _EDGE absorbs that, and no real fraction is that small.
        box = (
            int(np.floor(x * scale_x + _EDGE)),
            int(np.floor(y * scale_y + _EDGE)),
            int(np.ceil((x + w) * scale_x - _EDGE)),
            int(np.ceil((y + h) * scale_y - _EDGE)),
        )
        cells = (labels[y : y + h, x : x + w] == label).astype(np.uint8)
        # findContours follows 8-connected foreground, as labelled: one outer contour.
        contours, _ = cv2.findContours(cells, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(x, y))
        contour = max(contours, key=len)
        centres = contour[:, 0, :].astype(np.float64) + 0.5
        outline = centres * np.array([scale_x, scale_y])
        found.append(Region(box, round(peaks[label - 1], 4), outline))
    return found


def map_regions(raw: RawMap, model_hw: tuple[int, int], image_hw: tuple[int, int],
                threshold: float) -> list[Region]:
    """The regions of a method's map, found on the network's input grid.

    Pixel-level gradient maps are speckle, and boxes around single pixels tell nothing:
    their regions come from the map's local energy (σ = 2 % of the input's diagonal).

    Args:
        raw: the map on its native grid.
        model_hw: (height, width) of the network's input.
        image_hw: (height, width) of the original image, where boxes are given.
        threshold: the cut on the max-normalised map.
    """
    mh, mw = model_hw
    strength = normalise(resize(raw.values, mh, mw))
    if raw.grid == "model":
        strength = normalise(smooth(strength, 0.02 * float(np.hypot(mh, mw))))
    return regions(strength, threshold, image_hw[1] / mw, image_hw[0] / mh)
