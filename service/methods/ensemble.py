"""Combining an ensemble's members: mean scores, mean of max-normalised maps.

Pure NumPy over the members' outputs; the members' own methods produced them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.methods.base import RawMap
from service.methods.maps import normalise, resize


def mean_scores(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The members' scores (probabilities), averaged label by label."""
    return np.mean(np.stack(scores).astype(np.float64), axis=0).astype(np.float32)


def mean_map(maps: Sequence[RawMap], grids: Sequence[tuple[int, int]],
             grid: tuple[int, int]) -> RawMap:
    """One map from the members' maps of the same method and class.

    Each member's raw map is resized (bilinear) to ``grid``, max-normalised
    (:func:`normalise`: |map| / max, so signed gradient maps contribute their magnitude)
    and the results are averaged. Points (CNN Fixations) are the union of the members'
    points, each mapped from its member's input grid onto ``grid``.

    Args:
        maps: one raw map per member, in member order.
        grids: each member's input grid (height, width), where its points live.
        grid: the ensemble's grid (height, width).
    """
    h, w = grid
    values = np.mean([normalise(resize(m.values, h, w)) for m in maps], axis=0)
    points = None
    if any(m.points is not None for m in maps):
        parts = [(m.points.astype(np.float64) + 0.5) * (w / gw, h / gh) - 0.5
                 for m, (gh, gw) in zip(maps, grids) if m.points is not None]
        points = np.unique(np.concatenate(parts).reshape(-1, 2), axis=0)
    return RawMap(values.astype(np.float32), maps[0].index, maps[0].grid, points)
