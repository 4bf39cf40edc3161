"""PNG/JPEG decoding: exact values, channel handling and the decompression-bomb guard."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service.errors import InvalidImage, PayloadTooLarge
from service.imaging import raster
from service.imaging.raster import RasterHeader, decode_jpeg, decode_png, jpeg_header, png_header
from tests.imaging.bombs import png_chunk
from tests.imaging.exif import DISPLAYED, jpeg_with_exif, orientation_tiff, png_with_exif


def _encode(ext: str, bgr_or_grey: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, bgr_or_grey, list(params))
    assert ok
    return buf.tobytes()


def _handmade_png(pixels: np.ndarray, colour_type: int, bit_depth: int) -> bytes:
    """A minimal PNG for layouts cv2.imencode cannot write (grey + alpha)."""
    height, width = pixels.shape[:2]
    samples = pixels.astype(">u2" if bit_depth == 16 else np.uint8)
    raw = b"".join(b"\x00" + samples[row].tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        raster.PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def grey8(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(5, 7), dtype=np.uint8)


@pytest.fixture
def rgb8(rng: np.random.Generator) -> np.ndarray:
    rgb = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)  # pure red pins the channel order
    return rgb


def test_png_grey8_exact(grey8: np.ndarray) -> None:
    image = decode_png(_encode(".png", grey8))
    assert image.format == "png"
    assert image.meta == {"bit_depth": 8, "channels": 1}
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, grey8.astype(np.float32) / np.float32(255))


def test_png_grey16_exact(rng: np.random.Generator) -> None:
    grey16 = rng.integers(0, 65536, size=(4, 9), dtype=np.uint16)
    grey16[0, 0], grey16[0, 1] = 0, 65535
    image = decode_png(_encode(".png", grey16))
    assert image.meta == {"bit_depth": 16, "channels": 1}
    np.testing.assert_array_equal(image.pixels, grey16.astype(np.float32) / np.float32(65535))
    assert image.pixels[0, 0] == 0.0 and image.pixels[0, 1] == 1.0


def test_png_rgb_is_rgb_not_bgr(rgb8: np.ndarray) -> None:
    image = decode_png(_encode(".png", rgb8[:, :, ::-1]))
    assert image.meta == {"bit_depth": 8, "channels": 3}
    np.testing.assert_array_equal(image.pixels, rgb8.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(image.pixels[0, 0], [1.0, 0.0, 0.0])


def test_png_rgb16_exact(rng: np.random.Generator) -> None:
    rgb16 = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    image = decode_png(_encode(".png", rgb16[:, :, ::-1]))
    assert image.meta == {"bit_depth": 16, "channels": 3}
    np.testing.assert_array_equal(image.pixels, rgb16.astype(np.float32) / np.float32(65535))


def test_png_rgba_drops_alpha(rgb8: np.ndarray) -> None:
    alpha = np.full(rgb8.shape[:2], 7, dtype=np.uint8)
    bgra = np.dstack([rgb8[:, :, ::-1], alpha])
    image = decode_png(_encode(".png", bgra))
    assert image.meta == {"bit_depth": 8, "channels": 3}
    np.testing.assert_array_equal(image.pixels, rgb8.astype(np.float32) / np.float32(255))


def test_png_grey_stored_as_rgb_becomes_grey(grey8: np.ndarray) -> None:
    image = decode_png(_encode(".png", np.dstack([grey8, grey8, grey8])))
    assert image.pixels.shape == grey8.shape
    assert image.meta["channels"] == 1
    np.testing.assert_array_equal(image.pixels, grey8.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_grey_alpha_becomes_grey(bit_depth: int) -> None:
    top = 2**bit_depth - 1
    grey = np.array([[0, 10, top], [top // 2, 3, 1]])
    alpha = np.array([[top, 0, 5], [top, 9, 0]])
    image = decode_png(_handmade_png(np.dstack([grey, alpha]), 4, bit_depth))
    assert image.meta == {"bit_depth": bit_depth, "channels": 1}
    np.testing.assert_array_equal(image.pixels, grey.astype(np.float32) / np.float32(top))


def test_jpeg_grey_within_tolerance() -> None:
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    image = decode_jpeg(_encode(".jpg", ramp, cv2.IMWRITE_JPEG_QUALITY, 95))
    assert image.format == "jpeg"
    assert image.meta == {"bit_depth": 8, "channels": 1}
    assert np.abs(image.pixels - ramp / 255.0).max() <= 4 / 255


def test_jpeg_colour_within_tolerance() -> None:
    rgb = np.zeros((16, 32, 3), dtype=np.uint8)
    rgb[:, :16] = (200, 30, 30)  # red half
    rgb[:, 16:] = (30, 30, 200)  # blue half
    image = decode_jpeg(_encode(".jpg", rgb[:, :, ::-1], cv2.IMWRITE_JPEG_QUALITY, 95))
    assert image.meta == {"bit_depth": 8, "channels": 3}
    # Away from the colour edge, where chroma subsampling blurs.
    assert np.abs(image.pixels[:, :12] - rgb[:, :12] / 255.0).max() <= 8 / 255
    assert np.abs(image.pixels[:, 20:] - rgb[:, 20:] / 255.0).max() <= 8 / 255


def test_header_dimensions_non_square(grey8: np.ndarray) -> None:
    assert png_header(_encode(".png", grey8)) == RasterHeader(7, 5, 1, 1)
    assert jpeg_header(_encode(".jpg", grey8)) == RasterHeader(7, 5, 1, 1)


def _samples(data: bytes) -> int:
    """Samples per pixel of the service's own OpenCV decode of ``data``."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), raster._IMREAD_FLAGS)
    return 1 if decoded.ndim == 2 else decoded.shape[2]


def test_header_samples_and_depth_as_opencv_decodes_them(grey8: np.ndarray) -> None:
    rgb16 = np.stack([grey8, grey8 + 1, grey8 + 2], axis=2).astype(np.uint16) * 257
    rgba16 = np.dstack([rgb16, rgb16[:, :, :1]])
    plain = _encode(".png", grey8)
    trns = png_chunk(b"tRNS", b"\x00\x00")
    uploads = {
        "png rgb 16": (_encode(".png", rgb16), RasterHeader(7, 5, 3, 2)),
        "png rgba 16 (alpha dropped)": (_encode(".png", rgba16), RasterHeader(7, 5, 3, 2)),
        "png grey + tRNS": (plain[:33] + trns + plain[33:], RasterHeader(7, 5, 1, 1)),
        "png grey + alpha (expanded to BGR)": (
            _handmade_png(np.dstack([grey8, grey8]), 4, 8), RasterHeader(7, 5, 3, 1)),
        "jpeg colour": (_encode(".jpg", rgb16[:, :, :3].astype(np.uint8)),
                        RasterHeader(7, 5, 3, 1)),
    }
    for name, (data, expected) in uploads.items():
        header = png_header(data) if name.startswith("png") else jpeg_header(data)
        assert header == expected, name
        assert header.samples == _samples(data), name


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
@pytest.mark.parametrize("big_endian", [False, True])
def test_the_exif_orientation_is_applied(orientation: int, big_endian: bool,
                                         rng: np.random.Generator) -> None:
    """PNG (eXIf chunk) and JPEG (APP1) uploads are decoded as viewers show them: the
    stored pixels (the same file without the tag) turned as the tag says."""
    grey = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    tiff = orientation_tiff(orientation, big_endian=big_endian)
    for stored, tagged, decoder in (
        (_encode(".png", grey), png_with_exif, decode_png),
        (_encode(".png", rgb), png_with_exif, decode_png),
        (_encode(".jpg", np.kron(grey, np.ones((4, 4), np.uint8))), jpeg_with_exif,
         decode_jpeg),
    ):
        image = decoder(tagged(stored, tiff))
        np.testing.assert_array_equal(image.pixels, DISPLAYED[orientation](
            decoder(stored).pixels))
        assert image.meta == decoder(stored).meta


@pytest.mark.parametrize("tiff", [
    orientation_tiff(6)[:12],  # cut inside the IFD
    orientation_tiff(0), orientation_tiff(9), orientation_tiff(65535),  # no orientation TIFF defines
    b"II" + struct.pack("<HI", 42, 10**6),  # the IFD far beyond the data
    b"II" + struct.pack("<HIH", 42, 8, 1) + struct.pack("<HHII", 0x0112, 3, 4, 10**6),
    b"not a TIFF header", b"",
], ids=["truncated", "orientation 0", "orientation 9", "orientation 65535", "IFD beyond",
        "value beyond", "not TIFF", "empty"])
def test_a_broken_or_meaningless_orientation_leaves_the_pixels_as_stored(
        tiff: bytes, grey8: np.ndarray) -> None:
    png = _encode(".png", grey8)
    np.testing.assert_array_equal(decode_png(png_with_exif(png, tiff)).pixels,
                                  decode_png(png).pixels)
    jpeg = _encode(".jpg", grey8)
    np.testing.assert_array_equal(decode_jpeg(jpeg_with_exif(jpeg, tiff)).pixels,
                                  decode_jpeg(jpeg).pixels)


def test_an_ifd_that_claims_more_entries_than_it_holds_still_turns(grey8: np.ndarray) -> None:
    # The one entry there is read; the count's 65,534 missing ones are not looked for.
    jpeg = _encode(".jpg", grey8)
    np.testing.assert_array_equal(
        decode_jpeg(jpeg_with_exif(jpeg, orientation_tiff(6, count=0xFFFF))).pixels,
        DISPLAYED[6](decode_jpeg(jpeg).pixels))


def test_truncated_png_is_invalid(grey8: np.ndarray) -> None:
    data = _encode(".png", grey8)
    for cut in (8, 20, 30, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidImage, match="PNG data could not be decoded"):
            decode_png(data[:cut])


def test_truncated_jpeg_is_invalid(rng: np.random.Generator) -> None:
    noise = (rng.random((64, 80)) * 255).astype(np.uint8)
    data = _encode(".jpg", noise)
    # Inside the headers, then inside the entropy-coded scan.
    for cut in (2, 10, 100, len(data) // 2, len(data) - 20):
        with pytest.raises(InvalidImage, match="JPEG data"):
            decode_jpeg(data[:cut])


def test_random_bytes_are_invalid(rng: np.random.Generator) -> None:
    junk = rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage, match="no PNG signature"):
        decode_png(junk)
    with pytest.raises(InvalidImage, match="no JPEG start-of-image"):
        decode_jpeg(junk)


def test_corrupt_png_after_valid_header_is_invalid(rng: np.random.Generator) -> None:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    junk = rng.integers(0, 256, size=500, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage, match=r"could not be decoded \(truncated or corrupt\)"):
        decode_png(raster.PNG_SIGNATURE + ihdr + junk)


def test_png_without_ihdr_first_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="IHDR"):
        decode_png(raster.PNG_SIGNATURE + png_chunk(b"IEND", b""))


def test_huge_png_header_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: object) -> None:
        raise AssertionError("cv2.imdecode called for an oversized image")

    monkeypatch.setattr(raster.cv2, "imdecode", must_not_decode)
    bomb = raster.PNG_SIGNATURE + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    )
    with pytest.raises(PayloadTooLarge, match=r"100000x100000 = 10000000000 pixels"):
        decode_png(bomb)


def test_huge_jpeg_header_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raster.cv2, "imdecode", lambda *args: pytest.fail("decoded"))
    # SOI, an APP0 segment to skip, then SOF0 declaring 65535 x 65000 with one component.
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65000, 65535, 1) + b"\x01\x11\x00"
    with pytest.raises(PayloadTooLarge, match=r"65535x65000"):
        decode_jpeg(b"\xff\xd8" + app0 + sof0 + b"\xff\xda")


def test_max_pixels_is_passed_down(grey8: np.ndarray) -> None:
    data = _encode(".png", grey8)
    assert decode_png(data, max_pixels=35).pixels.shape == (5, 7)
    with pytest.raises(PayloadTooLarge, match="limit is 34 pixels"):
        decode_png(data, max_pixels=34)
    with pytest.raises(PayloadTooLarge):
        decode_jpeg(_encode(".jpg", grey8), max_pixels=34)


def test_jpeg_without_frame_header_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="no frame header before scan"):
        jpeg_header(b"\xff\xd8\xff\xda\x00\x08" + bytes(20))


def test_cv2_error_becomes_invalid_image(
    grey8: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raise_cv2_error(*args: object) -> None:
        raise cv2.error("simulated OpenCV assertion")

    monkeypatch.setattr(raster.cv2, "imdecode", raise_cv2_error)
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        decode_png(_encode(".png", grey8))
