"""What every decoder returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


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
        source: DICOM only (None for PNG/JPEG): the source header, every element but the
            pixel data, so that derived objects can join the source study. It holds patient
            data: never log, print or return it (``repr`` leaves it out).
    """

    pixels: np.ndarray
    format: str
    meta: dict[str, str | int] = field(default_factory=dict)
    source: Dataset | None = field(default=None, repr=False, compare=False)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])
