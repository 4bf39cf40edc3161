"""Which JPEG 2000 codestream a frame holds, and the size checks that depend on it."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels.decoders.base import Decoder

from service.errors import DecodeBudgetExceeded, InvalidDicom, PayloadTooLarge
from service.imaging import j2k
from service.imaging.dicom import decode_dicom
from tests.imaging import bombs
from tests.imaging.memory import MiB, peak_rss


def _mr_small() -> pydicom.Dataset:
    return pydicom.dcmread(bombs.testdata("MR_small_jp2klossless.dcm"))


def _frame() -> bytes:
    return get_frame(_mr_small().PixelData, 0, number_of_frames=1)


def _with_frame(frame: bytes) -> bytes:
    ds = _mr_small()
    ds.PixelData = encapsulate([frame])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_raw_codestream_is_itself() -> None:
    frame = _frame()
    assert j2k.locate(frame) == frame


def test_jp2_codestream_is_the_jp2c_box_whatever_comes_before() -> None:
    frame = _frame()
    decoy = bombs.box(b"xml ", b"<x>" + bombs.with_siz(frame, 9, 9)[:64] + b"</x>")
    assert j2k.locate(bombs.jp2(frame, before=decoy)) == frame


def test_jp2_box_lengths_extended_and_to_the_end() -> None:
    frame = _frame()
    plain = bombs.jp2(frame)
    at = plain.index(b"jp2c") - 4
    # XLBox: length 1, then a 64-bit length counting the 16-byte header.
    extended = plain[:at] + struct.pack(">I4sQ", 1, b"jp2c", 16 + len(frame)) + frame
    assert j2k.locate(extended) == frame
    # Length 0: the box runs to the end of the file.
    assert j2k.locate(plain[:at] + struct.pack(">I4s", 0, b"jp2c") + frame) == frame


@pytest.mark.parametrize("name", ["no jp2c box", "box shorter than its header",
                                  "jp2c without SOC/SIZ", "SOC/SIZ only inside another box",
                                  "SOC/SIZ after a prefix"])
def test_no_decodable_codestream(name: str) -> None:
    frame = _frame()
    plain = bombs.jp2(frame)
    at = plain.index(b"jp2c") - 4
    cases = {
        "no jp2c box": plain[:at],
        "box shorter than its header": plain[:at] + struct.pack(">I4s", 5, b"jp2c") + frame,
        "jp2c without SOC/SIZ": plain[:at] + bombs.box(b"jp2c", frame[4:]),
        "SOC/SIZ only inside another box": plain[:at] + bombs.box(b"xml ", frame),
        "SOC/SIZ after a prefix": b"\x00\x00" + frame,
    }
    assert j2k.locate(cases[name]) is None
    with pytest.raises(InvalidDicom, match="no codestream header"):
        decode_dicom(_with_frame(cases[name]))


def test_jp2_wrapped_frame_decodes_like_the_raw_one() -> None:
    frame = _frame()
    raw = decode_dicom(_with_frame(frame))
    wrapped = decode_dicom(_with_frame(bombs.jp2(frame, before=bombs.box(b"xml ", b"<x/>"))))
    np.testing.assert_array_equal(wrapped.pixels, raw.pixels)
    assert raw.pixels.std() > 0  # a real image, not a constant
    # The reduced-resolution path reads the same codestream (half size: 32 x 32).
    reduced = decode_dicom(_with_frame(bombs.jp2(frame)), min_size=(32, 32))
    assert reduced.pixels.shape == (32, 32) and reduced.original_size == (64, 64)


@pytest.mark.parametrize(("side", "error", "match"), [
    (24000, PayloadTooLarge, "compressed frame image is 24000x24000"),
    (7000, DecodeBudgetExceeded, r"DICOM image \(7000x7000\)"),
])
def test_decoy_header_in_an_earlier_box_is_not_what_is_checked(
        side: int, error: type[Exception], match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame's first SOC/SIZ says 64 x 64 (as Rows/Columns do); its jp2c box says more."""
    bomb = bombs.j2k_decoy_dicom(side)
    assert len(bomb) < 10_000
    first = bomb.index(b"\xff\x4f\xff\x51")
    assert struct.unpack(">II", bomb[first + 8 : first + 16]) == (64, 64)  # the decoy
    # Refused from the headers: OpenJPEG would allocate side^2 32-bit samples (2.3 GB).
    monkeypatch.setattr(Decoder, "as_array", lambda *a, **k: pytest.fail("decoded"))
    with peak_rss() as peak, pytest.raises(error, match=match):
        decode_dicom(bomb)
    assert peak.growth < 32 * MiB
