"""The per-request decode budget: estimated from headers, refused before decoding."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset

from service.errors import DecodeBudgetExceeded, PayloadTooLarge, ServiceError
from service.imaging import budget, decode
from tests.imaging import bombs
from tests.imaging.memory import MiB, peak_rss


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _jpeg(array: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", array)[1].tobytes()


def _noise(*shape: int, dtype: type = np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return np.random.default_rng(7).integers(0, top, size=shape, endpoint=True).astype(dtype)


UPLOADS: dict[str, Callable[[], bytes]] = {
    "png grey 8": lambda: _png(_noise(1200, 1000)),
    "png grey 16": lambda: _png(_noise(1200, 1000, dtype=np.uint16)),
    "png rgb 8": lambda: _png(_noise(1200, 1000, 3)),
    "png rgba 16": lambda: _png(_noise(600, 500, 4, dtype=np.uint16)),
    "png grey+alpha": lambda: bombs.png_bomb(1000, 800, colour_type=4),
    "jpeg grey": lambda: _jpeg(_noise(1200, 1000)),
    "jpeg rgb": lambda: _jpeg(_noise(1200, 1000, 3)),
    **{f"dicom {name}": (lambda n=name: bombs.testdata(n).read_bytes()) for name in (
        "RG1_UNCR.dcm",  # 1955 x 1841 16-bit MONOCHROME1
        "RG1_J2KR.dcm",  # the same, JPEG 2000 lossless
        "CT_small.dcm",  # small: the per-pixel float64 pipeline
        "US1_UNCR.dcm",  # RGB
        "SC_rgb_rle.dcm",  # RGB, RLE
        "SC_rgb_32bit.dcm",
        "OBXXXX1A.dcm",  # palette colour
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "image_dfl.dcm",  # deflated
        "emri_small.dcm",  # multi-frame
    )},
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_the_estimate_bounds_what_the_decode_allocates(name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every array Python allocates while decoding fits in the estimate, which is not more
    than twice that (plus 6 MiB of fixed allowances) where no C codec holds memory numpy
    cannot see (OpenJPEG's buffers are in the estimate but not in tracemalloc's count)."""
    data = UPLOADS[name]()
    seen: list[budget.Footprint] = []
    check = budget.check

    def recording(footprint: budget.Footprint, max_bytes: int) -> None:
        seen.append(footprint)
        check(footprint, max_bytes)

    monkeypatch.setattr(budget, "check", recording)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        image = decode(data, None)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    (footprint,) = seen
    assert (footprint.height, footprint.width) == (image.height, image.width)
    # 64 KiB: Python objects (the DecodedImage, meta, array headers), not image-sized.
    assert peak <= footprint.total + 64 * 1024, (peak, footprint)
    if "J2K" not in name:
        assert footprint.total <= 2 * peak + 6 * MiB, (peak, footprint)


def test_a_small_png_of_7000_by_7000_is_refused_before_decoding() -> None:
    bomb = bombs.png_bomb(7000, 7000)
    assert len(bomb) < 64_000  # 49 megapixels of zeros
    with peak_rss() as peak, pytest.raises(DecodeBudgetExceeded) as caught:
        decode(bomb, "image/png")
    assert caught.value.detail == ("decoding this PNG image (7000x7000) would take about "
                                   "234 MiB of memory; the limit is 224 MiB")
    assert caught.value.code == "decode_budget_exceeded"
    assert isinstance(caught.value, PayloadTooLarge)  # 413 at the edge
    assert peak.growth < 16 * MiB


def test_the_budget_counts_bytes_not_pixels() -> None:
    # The same pixel count: grey 8-bit (5 bytes a pixel) fits in 8 MiB, RGB 16-bit (24) not.
    grey = decode(bombs.png_bomb(1200, 1000), "image/png", max_decode_bytes=8 * MiB)
    assert grey.pixels.shape == (1000, 1200)
    with pytest.raises(DecodeBudgetExceeded, match=r"about 27 MiB of memory; the limit is 8"):
        decode(bombs.png_bomb(1200, 1000, colour_type=2, bit_depth=16), "image/png",
               max_decode_bytes=8 * MiB)
    with pytest.raises(DecodeBudgetExceeded, match="JPEG image"):
        decode(_jpeg(_noise(1200, 1000, 3)), "image/jpeg", max_decode_bytes=8 * MiB)


def test_dicom_budget_is_checked_before_the_pixels_are_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels.decoders.base import Decoder

    data = bombs.testdata("RG1_UNCR.dcm").read_bytes()
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DecodeBudgetExceeded, match=r"DICOM image \(1841x1955\)"):
        decode(data, None, max_decode_bytes=16 * MiB)


def test_an_image_the_caller_refuses_is_refused_before_its_size_is_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE SCP is sent every image of a study: a huge one of another modality is
    "not for this model", not "too large" (the sender would retry it) nor a decode error."""
    from pydicom.pixels.decoders.base import Decoder

    class Refused(ServiceError):
        pass

    seen: list[object] = []

    def refuse(source: Dataset) -> None:
        seen.append((source.Modality, source.Rows, source.Columns))
        raise Refused("not for this model")

    data = bombs.testdata("RG1_UNCR.dcm").read_bytes()
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(Refused):  # the budget alone refuses it (the test above)
        decode(data, None, max_decode_bytes=16 * MiB, max_pixels=1000, accept=refuse)
    assert seen == [("CR", 1955, 1841)]
    # Taken: the limits apply as before, PNG and JPEG are never asked about.
    with pytest.raises(DecodeBudgetExceeded):
        decode(data, None, max_decode_bytes=16 * MiB, accept=lambda source: None)
    decode(bombs.png_bomb(64, 64), "image/png", accept=refuse)
    assert len(seen) == 1


def test_a_deflate_bomb_is_counted_in_bounded_memory() -> None:
    bomb = bombs.deflate_bomb(160 << 20)  # 160 MiB of zeros in ~160 KB, over the ~112 MB
    assert len(bomb) < 200_000  # the default budget lets a dataset inflate to
    with peak_rss() as peak, pytest.raises(PayloadTooLarge, match="inflates to more than"):
        decode(bomb, None)
    assert peak.growth < 16 * MiB  # was the whole inflated limit (~467 MB) before


def test_the_default_admits_the_largest_chest_radiographs() -> None:
    """4300 x 4300 at 16 bits (a 43 cm detector at 100 um): 6 bytes a pixel, 111 MB."""
    side = 4300
    png16 = bombs.png_bomb(side, side, bit_depth=16)
    image = decode(png16, "image/png")  # 6 bytes a pixel: 111 MB
    assert image.pixels.shape == (side, side) and image.meta["bit_depth"] == 16
