"""What every decoder returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload, ready for preprocessing.

    Attributes:
        pixels: float32 array, (H, W) for grey or (H, W, 3) for RGB, on the 0..1 display
            scale: bone bright for radiographs (MONOCHROME1 already inverted, windowing
            already applied for DICOM).
        format: "png", "jpeg" or "dicom".
        meta: non-identifying facts about the source (DICOM UIDs, modality, frame count,
            bit depth). Never patient names, IDs or dates.
    """

    pixels: np.ndarray
    format: str
    meta: dict[str, str | int] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])
