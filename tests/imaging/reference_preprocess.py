"""``to_model_input`` as it was before the faster resize and normalisation: a reference.

Copied verbatim from ``service/imaging/preprocess.py`` at commit 276c595 (one
``cv2.resize`` call, normalisation broadcast over the trailing channel axis), so tests can
hold the current version to it and ``tools/bench_decode.py`` can time both in one run.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.imaging.base import DecodedImage
from service.imaging.preprocess import BT601_LUMA, ModelInput
from service.models.spec import InputSpec, Layout


def to_model_input(image: DecodedImage, spec: InputSpec) -> ModelInput:
    """Resize, match channels and normalise a decoded image for the network.

    Args:
        image: decoded pixels, (H, W) or (H, W, 3), float32 0..1.
        spec: the network's input description.

    Returns:
        The network input and the resized 0..1 image.

    Raises:
        ValueError: the spec or the pixels have an unsupported shape (a programming or
            model-configuration error, not a client error).
    """
    if spec.channels not in (1, 3):
        raise ValueError(f"only 1- or 3-channel networks are supported, not {spec.channels}")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels:
        raise ValueError("spec.mean and spec.std need one value per channel")

    resized = _resize(image.pixels.astype(np.float32, copy=False), spec.height, spec.width)
    image01 = _match_channels(resized, spec.channels)

    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (image01 - mean) / std  # broadcasts over the trailing channel axis
    if spec.layout == Layout.NCHW:
        tensor = normalised.transpose(2, 0, 1)[np.newaxis]
    else:
        tensor = normalised[np.newaxis]
    return ModelInput(
        image01=np.ascontiguousarray(image01, dtype=np.float32),
        tensor=np.ascontiguousarray(tensor, dtype=np.float32),
    )


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stretch to height x width; area averaging only when shrinking both ways."""
    in_height, in_width = pixels.shape[:2]
    if (in_height, in_width) == (height, width):
        return pixels
    # INTER_AREA antialiases a downscale; for upscales (or mixed) it degenerates to
    # nearest-like behaviour, where bilinear is the better choice.
    shrinking = height < in_height and width < in_width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(pixels, (width, height), interpolation=interpolation)


def _match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (H, W, channels)."""
    if pixels.ndim == 2:
        grey = pixels[:, :, np.newaxis]
        return np.repeat(grey, 3, axis=2) if channels == 3 else grey
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got shape {pixels.shape}")
    if channels == 3:
        return pixels
    luma = pixels @ np.asarray(BT601_LUMA, dtype=np.float32)
    return luma[:, :, np.newaxis].astype(np.float32, copy=False)
