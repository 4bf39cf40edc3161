"""Turning raw maps into what clients receive: resized maps, PNG, overlay, .npy."""

from __future__ import annotations

import base64
import io
from enum import StrEnum

import cv2
import numpy as np

from service.errors import InvalidParameter


class Encoding(StrEnum):
    PNG = "png"
    NPY = "npy"
    OVERLAY = "overlay"


class Size(StrEnum):
    ORIGINAL = "original"
    MODEL = "model"
    FEATURE = "feature"


def resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (H, W) map or (H, W, C) image to (height, width)."""
    if values.shape[:2] == (height, width):
        return values.astype(np.float32, copy=False)
    return cv2.resize(values.astype(np.float32), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D map (kernel ±3σ, reflected borders)."""
    return cv2.GaussianBlur(values.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)


def display_sigma(shape: tuple[int, ...], grid: str) -> float:
    """σ (pixels) for drawing a map: pixel-level gradient maps ("model" grid) are shown as
    their local magnitude, σ = 1 % of the map's diagonal; CAM-type maps as they are."""
    return 0.01 * float(np.hypot(shape[0], shape[1])) if grid == "model" else 0.0


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


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise InvalidParameter("the heatmap could not be encoded as PNG")
    return bytes(buf)


def overlay(normalised: np.ndarray, image01: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A JET colour overlay of a normalised map on the image (RGB uint8, same grid)."""
    grey = image01 if image01.ndim == 2 else image01.mean(axis=2)
    base = np.repeat((np.clip(grey, 0, 1) * 255).round()[..., None], 3, axis=2)
    colour = cv2.applyColorMap((normalised * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    weight = (alpha * normalised)[..., None]
    return (base * (1 - weight) + colour * weight).round().astype(np.uint8)


def encode(values: np.ndarray, encoding: Encoding, image01: np.ndarray | None,
           overlay_sigma: float = 0.0) -> str:
    """Base64 of the map in ``encoding``; ``image01`` is the image on the map's grid (an
    overlay needs it, the other encodings do not).

    ``overlay_sigma`` > 0 makes the overlay show the map's local magnitude (a Gaussian of
    that σ in pixels): a pixel-level gradient map is otherwise a faint speckle over the
    image. PNG and NPY always carry the map itself.
    """
    if encoding is Encoding.NPY:
        buf = io.BytesIO()
        np.save(buf, values.astype(np.float32), allow_pickle=False)
        data = buf.getvalue()
    elif encoding is Encoding.PNG:
        data = _png((normalise(values) * 255).round().astype(np.uint8))
    else:
        if image01 is None:
            raise ValueError("an overlay needs the image")
        shown = smooth(np.abs(values), overlay_sigma) if overlay_sigma > 0 else values
        rgb = overlay(normalise(shown), image01)
        data = _png(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return base64.b64encode(data).decode("ascii")
