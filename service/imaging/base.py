"""What every decoder returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


class LinearWindow(NamedTuple):
    """A VOI window with LINEAR_EXACT semantics (PS3.3 C.11.2.1.3.2): modality value v
    shows as (v - center) / width + 0.5, clipped to 0..1."""

    center: float
    width: float


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
        original_size: (height, width) of the source image when ``pixels`` were decoded at
            a reduced resolution (JPEG 2000 for a small network input); None when
            ``pixels`` are the full image. ``width``/``height`` always give the original:
            maps, regions and points are in original pixel coordinates.
        window: DICOM grey images only: the window that mapped the modality values to
            ``pixels`` when it was not the file's own VOI LUT or window: the caller's
            override, or min-max scaling as the window from the minimum to the maximum.
            None: the file's VOI (or not a grey DICOM image).
    """

    pixels: np.ndarray
    format: str
    meta: dict[str, str | int] = field(default_factory=dict)
    source: Dataset | None = field(default=None, repr=False, compare=False)
    original_size: tuple[int, int] | None = None
    window: LinearWindow | None = None

    @property
    def height(self) -> int:
        """The original image's height (Rows), whatever resolution ``pixels`` have."""
        if self.original_size is not None:
            return int(self.original_size[0])
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        """The original image's width (Columns), whatever resolution ``pixels`` have."""
        if self.original_size is not None:
            return int(self.original_size[1])
        return int(self.pixels.shape[1])

    @property
    def reduced(self) -> bool:
        """Whether ``pixels`` are smaller than the original image."""
        return self.original_size is not None and self.pixels.shape[:2] != self.original_size
