"""EXIF orientation written into PNG and JPEG files by hand, and what each value means."""

from __future__ import annotations

import struct

import numpy as np

from tests.imaging.bombs import png_chunk

# What each EXIF orientation asks a viewer to do with the stored pixels (TIFF 6.0 /
# Exif 2.3, tag 0x0112: where the stored row 0 and column 0 are to be shown).
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # row 0 on top, column 0 on the right: mirrored
    3: lambda a: a[::-1, ::-1],  # turned by 180°
    4: lambda a: a[::-1],  # row 0 at the bottom, column 0 on the left
    5: lambda a: a.swapaxes(0, 1),  # row 0 on the left, column 0 on top: transposed
    6: lambda a: np.rot90(a, -1),  # row 0 on the right, column 0 on top: 90° clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # row 0 on the right, column 0 at the bottom
    8: lambda a: np.rot90(a, 1),  # row 0 on the left, column 0 at the bottom: 90° anticlockwise
}


def orientation_tiff(orientation: int, *, big_endian: bool = False, count: int = 1) -> bytes:
    """A TIFF structure whose one IFD holds the Orientation tag (SHORT) alone."""
    order = ">" if big_endian else "<"
    return ((b"MM" if big_endian else b"II") + struct.pack(order + "HIH", 42, 8, count)
            + struct.pack(order + "HHIH", 0x0112, 3, 1, orientation) + b"\x00\x00"
            + struct.pack(order + "I", 0))


def jpeg_with_exif(jpeg: bytes, tiff: bytes) -> bytes:
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def png_with_exif(png: bytes, tiff: bytes) -> bytes:
    return png[:33] + png_chunk(b"eXIf", tiff) + png[33:]  # right after IHDR
