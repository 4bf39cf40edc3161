"""Independent NumPy references of what the renderers draw (float64, written from the
definitions in service.outputs.render's docstrings, not from its code)."""

from __future__ import annotations

import cv2
import numpy as np

ALPHA = 0.45


def jet_rgb(levels: np.ndarray) -> np.ndarray:
    """OpenCV's JET colour of 8-bit levels, RGB."""
    bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    return bgr[:, ::-1][levels]


def strength(raw: np.ndarray, height: int, width: int, sigma: float = 0.0) -> np.ndarray:
    """8-bit map: |raw| (blurred by σ on its own grid), / max, bilinear to the grid, × 255."""
    values = np.abs(raw.astype(np.float64))
    if sigma > 0:
        values = cv2.GaussianBlur(values, (0, 0), sigmaX=sigma, sigmaY=sigma)
    peak = values.max()
    values = values / peak if peak > 0 else np.zeros_like(values)
    if values.shape != (height, width):
        values = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.round(values * 255).astype(np.uint8)


def overlay(levels: np.ndarray, grey01: np.ndarray) -> np.ndarray:
    """RGB grey·(1 − w) + JET·w, w = ALPHA·level/255, on the map's grid."""
    grey = np.round(np.clip(grey01, 0, 1) * 255)[..., None]
    weight = ALPHA * levels.astype(np.float64)[..., None] / 255
    return np.round(grey * (1 - weight) + jet_rgb(levels) * weight)
