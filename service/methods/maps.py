"""Array operations on maps shared by methods, ensembles and regions (no encoding here)."""

from __future__ import annotations

import cv2
import numpy as np


def resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (H, W) map or (H, W, C) image to (height, width).

    Pixel centres map onto pixel centres (OpenCV's convention), so a map stretched onto an
    image lines up with it exactly as a browser or CSS stretch does.
    """
    if values.shape[:2] == (height, width):
        return values.astype(np.float32, copy=False)
    return cv2.resize(values.astype(np.float32, copy=False), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D map (kernel ±3σ, reflected borders)."""
    return cv2.GaussianBlur(values.astype(np.float32, copy=False), (0, 0),
                            sigmaX=sigma, sigmaY=sigma)


def normalise(values: np.ndarray) -> np.ndarray:
    """|map| scaled to [0, 1] by its maximum (all zeros stay zeros).

    CAM-type maps are non-negative already; for signed gradient maps the magnitude is what
    a picture or a region can show.
    """
    magnitude = np.abs(values)
    peak = float(magnitude.max()) if values.size else 0.0
    if peak <= 0 or not np.isfinite(peak):
        return np.zeros_like(values, dtype=np.float32)
    return (magnitude / peak).astype(np.float32)


__all__ = ["normalise", "resize", "smooth"]
