"""The media-type registry and byte sniffing in service.imaging.decode."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from service.errors import (
    EmptyBody,
    InvalidDicom,
    InvalidImage,
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.imaging import SUPPORTED_MEDIA_TYPES, decode, sniff_media_type


def _dicom(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(str(path)).read_bytes()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.arange(12, dtype=np.uint8).reshape(3, 4) * 20


@pytest.fixture(scope="module")
def png(grey: np.ndarray) -> bytes:
    return cv2.imencode(".png", grey)[1].tobytes()


@pytest.fixture(scope="module")
def jpeg(grey: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", grey)[1].tobytes()


@pytest.fixture(scope="module")
def dcm() -> bytes:
    return _dicom("MR_small.dcm")


GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01" + bytes(30)


def test_registry_lists_the_supported_types() -> None:
    assert SUPPORTED_MEDIA_TYPES == ("image/png", "image/jpeg", "image/jpg", "image/pjpeg",
                                     "image/x-png", "application/dicom")


def test_sniff(png: bytes, jpeg: bytes, dcm: bytes) -> None:
    assert sniff_media_type(png) == "image/png"
    assert sniff_media_type(jpeg) == "image/jpeg"
    assert sniff_media_type(dcm) == "application/dicom"
    assert sniff_media_type(_dicom("OT-PAL-8-face.dcm")) == "application/dicom"  # no preamble
    assert sniff_media_type(GIF) is None
    assert sniff_media_type(b"hello") is None


def test_empty_body() -> None:
    with pytest.raises(EmptyBody, match="no image bytes"):
        decode(b"", "image/png")
    with pytest.raises(EmptyBody):
        decode(b"", None)


@pytest.mark.parametrize(
    "media_type",
    [
        None,
        "application/octet-stream",
        "application/octet-stream; name=upload.bin",
        "application/x-www-form-urlencoded",  # curl --data-binary default
    ],
)
def test_generic_types_are_sniffed(
    media_type: str | None, png: bytes, jpeg: bytes, dcm: bytes, grey: np.ndarray
) -> None:
    image = decode(png, media_type)
    assert image.format == "png"
    np.testing.assert_array_equal(image.pixels, grey / np.float32(255))
    assert decode(jpeg, media_type).format == "jpeg"
    assert decode(dcm, media_type).format == "dicom"


def test_parameters_and_case_are_ignored(png: bytes) -> None:
    assert decode(png, "image/png; charset=x").format == "png"
    assert decode(png, " IMAGE/PNG ").format == "png"


def test_unregistered_aliases(jpeg: bytes, png: bytes) -> None:
    assert decode(jpeg, "image/jpg").format == "jpeg"
    assert decode(jpeg, "image/pjpeg").format == "jpeg"
    assert decode(png, "image/x-png").format == "png"


@pytest.mark.parametrize(
    ("declared", "fixture", "expected"),
    [
        ("image/jpeg", "png", "png"),
        ("image/png", "jpeg", "jpeg"),
        ("image/png", "dcm", "dicom"),
        ("application/dicom", "png", "png"),
    ],
)
def test_bytes_win_over_a_wrong_declared_type(
    declared: str, fixture: str, expected: str, request: pytest.FixtureRequest
) -> None:
    assert decode(request.getfixturevalue(fixture), declared).format == expected


def test_unrecognised_bytes_get_the_declared_decoders_error() -> None:
    junk = bytes(range(256)) * 4
    with pytest.raises(InvalidImage, match="no PNG signature"):
        decode(junk, "image/png")
    with pytest.raises(InvalidImage, match="no JPEG start-of-image"):
        decode(junk, "image/jpeg")
    with pytest.raises(InvalidDicom, match="not DICOM"):
        decode(junk, "application/dicom")


@pytest.mark.parametrize("media_type", ["text/plain", "image/gif", "image/tiff", "video/mp4"])
def test_unsupported_declared_types(media_type: str, png: bytes) -> None:
    with pytest.raises(UnsupportedMediaType, match="image/png, image/jpeg") as caught:
        decode(GIF, media_type)
    assert media_type in caught.value.detail
    with pytest.raises(UnsupportedMediaType):
        decode(png, media_type)


def test_generic_type_with_unknown_bytes() -> None:
    with pytest.raises(UnsupportedMediaType, match="not PNG, JPEG or DICOM"):
        decode(GIF, "application/octet-stream")


def test_frame_window_and_limit_reach_the_decoder(png: bytes) -> None:
    multi = _dicom("emri_small.dcm")
    assert decode(multi, None, frame=9).meta["frames"] == 10
    with pytest.raises(InvalidParameter, match="out of range"):
        decode(multi, "application/dicom", frame=10)
    with pytest.raises(InvalidParameter, match="PNG and JPEG have 1 frame"):
        decode(png, "image/png", frame=1)
    windowed = decode(_dicom("MR_small.dcm"), None, window=(0.0, 1.0)).pixels
    assert set(np.unique(windowed)) <= {0.0, 1.0}
    # PNG/JPEG pixels are display values already: a window is ignored.
    assert decode(png, None, window=(0.0, 1.0)).pixels.max() == 220 / 255
    with pytest.raises(PayloadTooLarge, match="limit is 11 pixels"):
        decode(png, None, max_pixels=11)
