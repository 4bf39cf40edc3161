"""DICOM answers in the transfer syntax the Accept header names (its transfer-syntax
parameter, as DICOMweb has it): the captures' pixels compressed, checked against the
uncompressed capture of the same request by pydicom's decoders and by DCMTK's own."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from service.outputs.transfer_syntax import TRANSFER_SYNTAXES
from tests.api.conftest import (
    DATA,
    assert_problem,
    multipart_items,
    post_dicom,
    read_dicom,
)
from tests.dicom_tools import dciodvfy, dcmtk

PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"
DICOM = "application/dicom"
MULTIPART = 'multipart/related; type="application/dicom"'
PARAMS = {"methods": "gradcam", "classes": "Nodule"}
# DCMTK's decompressors, one per compressed syntax it reads (it has no JPEG 2000 codec).
DCMTK_DECODER = {JPEGLSLossless: "dcmdjpls", RLELossless: "dcmdrle", JPEGBaseline8Bit: "dcmdjpeg"}


def _capture(client: TestClient, accept: str) -> tuple[str, pydicom.Dataset]:
    r = post_dicom(client, PHANTOM.read_bytes(), accept, **PARAMS)
    assert r.status_code == 200, r.text
    return r.headers["content-type"], read_dicom(r.content)


@pytest.fixture(scope="module")
def plain(client: TestClient) -> np.ndarray:
    """The capture's RGB pixels, uncompressed."""
    media, sc = _capture(client, DICOM)
    assert media == DICOM
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    pixels: np.ndarray = sc.pixel_array
    return pixels


def test_the_default_is_explicit_vr_little_endian(client: TestClient, plain: np.ndarray) -> None:
    for accept in (f"{DICOM}; transfer-syntax=*",
                   f"{DICOM}; transfer-syntax={ExplicitVRLittleEndian}"):
        media, sc = _capture(client, accept)
        assert media == DICOM  # the parameter is optional for the default, and left out
        assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(sc.pixel_array, plain)


@pytest.mark.parametrize("uid", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_lossless_syntaxes_keep_every_pixel(client: TestClient, plain: np.ndarray,
                                            uid: str, tmp_path: Path) -> None:
    media, sc = _capture(client, f"{DICOM}; transfer-syntax={uid}")
    assert media == f"{DICOM}; transfer-syntax={uid}"
    assert sc.file_meta.TransferSyntaxUID == uid
    assert sc.PhotometricInterpretation == TRANSFER_SYNTAXES[uid].colour
    assert "LossyImageCompression" not in sc
    assert np.array_equal(sc.pixel_array, plain)
    if uid in DCMTK_DECODER:
        assert np.array_equal(_dcmtk_decoded(sc, uid, tmp_path), plain)
    _valid(sc, tmp_path)


def test_baseline_jpeg_is_marked_lossy(client: TestClient, plain: np.ndarray,
                                       tmp_path: Path) -> None:
    media, sc = _capture(client, f"{DICOM}; transfer-syntax={JPEGBaseline8Bit}")
    assert media == f"{DICOM}; transfer-syntax={JPEGBaseline8Bit}"
    assert sc.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert sc.PhotometricInterpretation == "YBR_FULL_422"
    assert sc.LossyImageCompression == "01"
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(sc.LossyImageCompressionRatio) == pytest.approx(
        plain.nbytes / len(next(pydicom.encaps.generate_frames(sc.PixelData,
                                                              number_of_frames=1))), rel=1e-3)
    assert float(sc.LossyImageCompressionRatio) > 5
    for decoded in (sc.pixel_array, _dcmtk_decoded(sc, JPEGBaseline8Bit, tmp_path)):
        error = np.abs(decoded.astype(np.int16) - plain)
        # Lossy: close on average, chroma subsampled at the colour edges of the overlay.
        # (measured: mean 1.65, 99th percentile 23, at most 130 at the caption's text)
        assert error.mean() < 2.5, error.mean()
        assert 0 < np.percentile(error, 99) < 32
    _valid(sc, tmp_path)


def test_multipart_compresses_the_captures_and_leaves_the_report(client: TestClient,
                                                                 plain: np.ndarray) -> None:
    r = post_dicom(client, PHANTOM.read_bytes(), f"{MULTIPART}; transfer-syntax={JPEGLSLossless}",
                   methods="gradcam,crm", classes="Nodule", dicom="sc,sr")
    assert r.status_code == 200, r.text
    # The whole names its first part's syntax (PS3.18 8.7.3.4), each part its own.
    assert r.headers["content-type"].startswith(
        f"{MULTIPART}; transfer-syntax={JPEGLSLossless}; boundary=")
    items = multipart_items(r)
    assert [media for media, _ in items] == [f"{DICOM}; transfer-syntax={JPEGLSLossless}"] * 2 \
        + [DICOM]
    *captures, report = (read_dicom(data) for _, data in items)
    assert [c.file_meta.TransferSyntaxUID for c in captures] == [JPEGLSLossless] * 2
    assert np.array_equal(captures[0].pixel_array, plain)
    # No Pixel Data, nothing to compress: the report stays in the default syntax.
    assert report.Modality == "SR"
    assert report.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_a_report_alone_is_answered_in_the_default_syntax(client: TestClient) -> None:
    r = post_dicom(client, PHANTOM.read_bytes(), f"{DICOM}; transfer-syntax={JPEGLSLossless}",
                   dicom="sr", **PARAMS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM
    assert read_dicom(r.content).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize(("accept", "expected"), [
    # The higher quality wins; at equal quality the server's order (the default first).
    (f"{DICOM}; transfer-syntax={JPEGLSLossless}; q=0.5, {DICOM}; transfer-syntax={RLELossless}",
     RLELossless),
    (f"{DICOM}; transfer-syntax={RLELossless}, {DICOM}; transfer-syntax={JPEGLSLossless}",
     JPEGLSLossless),
    (f"{DICOM}; transfer-syntax={JPEGLSLossless}, {DICOM}; q=0.9", JPEGLSLossless),
    (f"{DICOM}; transfer-syntax={JPEGLSLossless}; q=0.8, {DICOM}; q=0.9", ExplicitVRLittleEndian),
    # A syntax it does not write gives way to one it does.
    ((f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.91, "
      f"{DICOM}; transfer-syntax={RLELossless}; q=0.1"), RLELossless),
])
def test_quality_values_choose_the_syntax(client: TestClient, accept: str, expected: str) -> None:
    _, sc = _capture(client, accept)
    assert sc.file_meta.TransferSyntaxUID == expected


def test_a_syntax_it_does_not_write_is_406_naming_those_it_does(client: TestClient) -> None:
    r = post_dicom(client, PHANTOM.read_bytes(), f"{MULTIPART}; transfer-syntax=1.2.840.10008.1.2",
                   **PARAMS)
    body = assert_problem(r, 406, "not_acceptable")
    for uid in TRANSFER_SYNTAXES:
        assert uid in str(body["detail"])
    # /explain/dicom says the same.
    r = post_dicom(client, PHANTOM.read_bytes(), f"{DICOM}; transfer-syntax=1.2.840.10008.1.2",
                   path="/explain/dicom", **PARAMS)
    assert JPEGLSLossless in str(assert_problem(r, 406, "not_acceptable")["detail"])


def _dcmtk_decoded(sc: pydicom.Dataset, uid: str, folder: Path) -> np.ndarray:
    """The capture's pixels as DCMTK decompresses them (to RGB, for baseline JPEG's YCbCr)."""
    tool = dcmtk(DCMTK_DECODER[uid])
    assert tool, "DCMTK is not installed: `bash scripts/system-deps.sh` (run by `make test`)"
    src, out = folder / "compressed.dcm", folder / "decompressed.dcm"
    sc.save_as(src, enforce_file_format=True)
    # dcmdjpeg turns YCbCr into RGB by default (+cp).
    subprocess.run([tool, str(src), str(out)], check=True, capture_output=True, timeout=60)
    decoded = pydicom.dcmread(out)
    assert decoded.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, "1.2.840.10008.1.2")
    assert decoded.PhotometricInterpretation == "RGB"
    pixels: np.ndarray = decoded.pixel_array
    return pixels


def _valid(sc: pydicom.Dataset, folder: Path) -> None:
    buf = io.BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    report = dciodvfy(buf.getvalue(), folder, "check.dcm")
    assert "SCImage" in report
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
