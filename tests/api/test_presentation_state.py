"""POST /explain?dicom=gsps: the explanations as a Grayscale Softcopy Presentation State
over the source image, checked against the JSON answer, dicom3tools' dciodvfy and DCMTK's
own presentation-state renderer (dcmp2pgm)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

from service.imaging import decode
from service.methods import METHODS
from service.methods.regions import regions
from service.outputs.presentation_state import COLOURS, presentation_state
from service.outputs.secondary_capture import PATIENT_STUDY_KEYWORDS
from service.pipeline import Map
from tests.api.conftest import (
    DATA,
    assert_problem,
    multipart_parts,
    phantom_bytes,
    post_dicom,
    read_dicom,
)
from tests.dicom_tools import dciodvfy_errors, pydicom_data

DICOM = "application/dicom"
MULTIPART = 'multipart/related; type="application/dicom"'
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"
MONO1 = DATA / "dicom" / "phantom_nodule_mono1.dcm"
PARAMS = {"methods": "gradcam,crm_combined,fixations", "classes": "Nodule,Cardiomegaly"}

_post, _read = post_dicom, read_dicom


def _errors(data: bytes, folder: Path) -> list[str]:
    return dciodvfy_errors(data, folder, "GrayscaleSoftcopyPresentationState")


def _rendered(source: Path, gsps: bytes | None, folder: Path, frame: int = 0) -> np.ndarray:
    """The source as DCMTK's dcmp2pgm displays it under ``gsps`` (its own VOI without one):
    8-bit grey scaled to 0..1."""
    assert shutil.which("dcmp2pgm"), "DCMTK is not installed: `bash scripts/system-deps.sh`"
    command = ["dcmp2pgm", "-f", str(frame + 1)]
    if gsps is not None:
        (folder / "ps.dcm").write_bytes(gsps)
        command += ["-p", str(folder / "ps.dcm")]
    subprocess.run([*command, str(source), str(folder / "out.pgm")], check=True,
                   capture_output=True, timeout=60)
    picture = cv2.imread(str(folder / "out.pgm"), cv2.IMREAD_UNCHANGED)
    assert picture is not None and picture.dtype == np.uint8
    return picture.astype(np.float64) / 255.0


def _layers(ds: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    """Each graphic annotation by its layer's name."""
    return {a.GraphicLayer: a for a in ds.GraphicAnnotationSequence}


def test_gsps_draws_every_region_and_point_of_the_json_answer(client: TestClient,
                                                              tmp_path: Path) -> None:
    data = PHANTOM.read_bytes()
    source = _read(data)
    expected = _post(client, data, None, **PARAMS).json()
    r = _post(client, data, DICOM, dicom="gsps", **PARAMS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM
    ds = _read(r.content)
    assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert ds.Modality == "PR"
    assert ds.ContentLabel == "MEDEXPLAIN"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesNumber == 9950  # several methods
    # The methods name the series, shortened to fit LO's 64 characters.
    assert ds.SeriesDescription == ("medexplain regions gradcam,cr... - demo model, not for "
                                    "diagnosis")
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
        source.SOPClassUID, source.SOPInstanceUID)
    assert ds.PresentationLUTShape == "IDENTITY"  # MONOCHROME2
    assert ds.DisplayedAreaSelectionSequence[0].DisplayedAreaBottomRightHandCorner == [
        source.Columns, source.Rows]
    assert not _errors(r.content, tmp_path)

    explanations = expected["explanations"]
    annotations = list(ds.GraphicAnnotationSequence)
    layers = list(ds.GraphicLayerSequence)
    assert len(annotations) == len(layers) == len(explanations) + 1
    assert [layer.GraphicLayer for layer in layers] == [
        f"{e['method'].upper()} {n}" for n, e in enumerate(explanations, start=1)
    ] + [f"MEDEXPLAIN {len(explanations) + 1}"]
    assert [int(layer.GraphicLayerOrder) for layer in layers] == list(
        range(1, len(layers) + 1))
    colours = [tuple(layer.GraphicLayerRecommendedDisplayCIELabValue) for layer in layers]
    assert len(set(colours[:-1])) == len(colours) - 1  # one colour per explanation
    scores = {p["index"]: p["score"] for p in expected["predictions"]}
    # Regions are found on the network's input grid; outlines run through its cells' centres.
    height, width = client.get(f"/models/{expected['model']['name']}").json()["input"]["size"]
    cell = source.Columns / width, source.Rows / height
    for annotation, layer, explanation in zip(annotations[:-1], layers[:-1], explanations,
                                              strict=True):
        assert annotation.GraphicLayer == layer.GraphicLayer
        reference = annotation.ReferencedImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "ReferencedFrameNumber" not in reference  # single-frame source
        (legend,) = annotation.TextObjectSequence
        label = explanation["label"] or "all classes"
        score = "" if explanation["index"] is None else \
            f"  score {scores[explanation['index']]:.3f}"
        count = len(explanation["regions"])
        assert legend.UnformattedTextValue.startswith(
            f"{explanation['method']}  {label}{score}  {count} region")
        assert legend.BoundingBoxAnnotationUnits == "DISPLAY"
        assert layer.GraphicLayerDescription == legend.UnformattedTextValue
        objects = list(annotation.get("GraphicObjectSequence", []))
        lines = [o for o in objects if o.GraphicType == "POLYLINE"]
        points = [o for o in objects if o.GraphicType == "POINT"]
        assert len(lines) == count
        for line, region in zip(lines, explanation["regions"], strict=True):
            assert line.GraphicAnnotationUnits == "PIXEL"
            xy = np.asarray(line.GraphicData, dtype=np.float64).reshape(-1, 2)
            assert int(line.NumberOfGraphicPoints) == len(xy) >= 2
            np.testing.assert_array_equal(xy[0], xy[-1])  # closed
            x0, y0, x1, y1 = region["box"]
            # Inside the box, and within one grid cell of each of its edges.
            assert xy[:, 0].min() >= x0 and xy[:, 0].max() <= x1
            assert xy[:, 1].min() >= y0 and xy[:, 1].max() <= y1
            assert xy[:, 0].min() - x0 <= cell[0] and x1 - xy[:, 0].max() <= cell[0]
            assert xy[:, 1].min() - y0 <= cell[1] and y1 - xy[:, 1].max() <= cell[1]
        if explanation["points"] is None:
            assert not points
        else:
            got = np.array([list(p.GraphicData) for p in points], dtype=np.float64)
            # Pixel indices in JSON; DICOM puts the top-left pixel's centre at (0.5, 0.5).
            np.testing.assert_allclose(got, np.asarray(explanation["points"]) + 0.5,
                                       atol=2e-3)
            assert legend.UnformattedTextValue.endswith(f", {len(got)} points")
    (last,) = annotations[-1].TextObjectSequence
    assert last.UnformattedTextValue.startswith("medexplain ")
    assert f"model {expected['model']['name']} v{expected['model']['version']}" in \
        last.UnformattedTextValue
    assert last.UnformattedTextValue.endswith("DEMO MODEL, NOT FOR DIAGNOSIS")


def test_one_method_is_its_own_series_number(client: TestClient) -> None:
    r = _post(client, PHANTOM.read_bytes(), DICOM, dicom="gsps", methods="crm")
    assert r.status_code == 200, r.text
    ds = _read(r.content)
    assert ds.SeriesNumber == 9951 + list(METHODS).index("crm")
    assert ds.SeriesDescription == "medexplain regions crm - demo model, not for diagnosis"


@pytest.mark.parametrize("window", ["", "30,80", "none"])
def test_a_viewer_shows_the_image_as_the_model_was_shown(client: TestClient, tmp_path: Path,
                                                         window: str) -> None:
    """DCMTK applies the presentation state's Modality, VOI and Presentation LUTs: its
    picture is the decoder's 0..1 pixels to 8 bits, MONOCHROME1 inverted included."""
    data = MONO1.read_bytes()
    r = _post(client, data, DICOM, dicom="gsps", methods="gradcam", window=window)
    assert r.status_code == 200, r.text
    ds = _read(r.content)
    assert ds.PresentationLUTShape == "INVERSE"
    parsed = None if window == "" else "none" if window == "none" else \
        tuple(float(v) for v in window.split(","))
    decoded = decode(data, DICOM, window=parsed)
    assert (decoded.window is None) == (window == "")
    shown = _rendered(MONO1, r.content, tmp_path)
    np.testing.assert_allclose(shown, decoded.pixels, atol=1 / 255 + 1e-6)  # DCMTK rounds its own way
    if decoded.window is not None:
        # The decoder's LINEAR_EXACT window (c, w) as the LINEAR window (c + 0.5, w + 1).
        (voi,) = ds.SoftcopyVOILUTSequence
        assert voi.VOILUTFunction == "LINEAR"
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == pytest.approx(
            (decoded.window.center + 0.5, decoded.window.width + 1))
    # The test sees the polarity: the other shape shows the negative.
    ds.PresentationLUTShape = "IDENTITY"
    buf = io.BytesIO()
    ds.save_as(buf)
    negative = _rendered(MONO1, buf.getvalue(), tmp_path)
    assert np.abs(negative - decoded.pixels).mean() > 0.2


def test_a_real_radiograph(client: TestClient, tmp_path: Path) -> None:
    # RG1_UNCR: a 1841×1955 MONOCHROME1 CR with its own window.
    path = pydicom_data("RG1_UNCR.dcm")
    data = path.read_bytes()
    r = _post(client, data, DICOM, dicom="gsps", methods="gradcam,fixations",
              classes="Nodule")
    assert r.status_code == 200, r.text
    assert not _errors(r.content, tmp_path)
    ds = _read(r.content)
    assert "ModalityLUTSequence" not in ds and "RescaleSlope" not in ds  # RG1 has none
    (voi,) = ds.SoftcopyVOILUTSequence
    source = _read(data)
    assert (voi.WindowCenter, voi.WindowWidth) == (source.WindowCenter, source.WindowWidth)
    np.testing.assert_allclose(_rendered(path, r.content, tmp_path), decode(data, DICOM).pixels,
                               atol=1 / 255 + 1e-6)  # DCMTK rounds its own way
    # Kilobytes for what the captures say in megabytes.
    assert len(r.content) < 100_000


@pytest.mark.parametrize(("name", "frame"), [
    ("eCT_Supplemental.dcm", 1),  # enhanced CT: Rescale and windows per frame
    ("mlut_18.dcm", 0),  # a Modality LUT Sequence, no window: min-max
    ("vlut_04.dcm", 0),  # a VOI LUT Sequence
    ("CT_small.dcm", 0),  # Rescale, no window
    ("MR_small.dcm", 0),  # a window
])
def test_the_display_pipeline_of_other_grey_images(tmp_path: Path, name: str,
                                                   frame: int) -> None:
    # Built without the model, which takes radiographs only.
    path = pydicom_data(name)
    image = decode(path.read_bytes(), DICOM, frame=frame)
    cells = np.zeros((16, 16))
    cells[4:9, 5:11] = 1.0
    found = regions(cells, 0.5, image.width / 16, image.height / 16)
    corners = np.array([[0.0, 0.0], [image.width - 1.0, image.height - 1.0]])
    data = presentation_state(image, [Map("gradcam", 0, cells, False, found, corners)],
                              ["gradcam  x"], model="m", model_version="1", frame=frame)
    assert not _errors(data, tmp_path)
    ds = _read(data)
    (annotation, _) = ds.GraphicAnnotationSequence
    reference = annotation.ReferencedImageSequence[0]
    if image.meta["frames"] > 1:
        assert reference.ReferencedFrameNumber == frame + 1
    else:
        assert "ReferencedFrameNumber" not in reference
    line, *points = annotation.GraphicObjectSequence
    # The 6×5 cells' outline through their centres, on a grid of image.width / 16 columns.
    sx, sy = image.width / 16, image.height / 16
    xy = np.asarray(line.GraphicData, dtype=np.float64).reshape(-1, 2)
    np.testing.assert_allclose(xy[:, 0].min(), 5.5 * sx, rtol=1e-6)
    np.testing.assert_allclose(xy[:, 0].max(), 10.5 * sx, rtol=1e-6)
    np.testing.assert_allclose(xy[:, 1].min(), 4.5 * sy, rtol=1e-6)
    np.testing.assert_allclose(xy[:, 1].max(), 8.5 * sy, rtol=1e-6)
    np.testing.assert_allclose([list(p.GraphicData) for p in points],
                               [[0.5, 0.5], [image.width - 0.5, image.height - 0.5]])
    shown = _rendered(path, data, tmp_path, frame)
    if shown.shape != image.pixels.shape:  # dcmp2pgm scales small images up
        shown = cv2.resize(shown, (image.width, image.height), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(shown, image.pixels, atol=1 / 255 + 1e-6)  # DCMTK rounds its own way


def test_a_legend_of_many_lines_stays_on_the_display(tmp_path: Path) -> None:
    # A 14-label model asked for every method and class has 85 maps: their legend lines
    # share the height (DISPLAY units end at 1; past it highdicom refused: a 500).
    image = decode(PHANTOM.read_bytes(), DICOM)
    cells = np.zeros((16, 16))
    cells[4:9, 5:11] = 1.0
    found = regions(cells, 0.5, image.width / 16, image.height / 16)
    maps = [Map("gradcam", k % 4, cells, False, found) for k in range(85)]
    data = presentation_state(image, maps, [f"gradcam {k}" for k in range(85)], model="m",
                              model_version="1")
    assert not _errors(data, tmp_path)
    boxes = [(list(t.BoundingBoxTopLeftHandCorner), list(t.BoundingBoxBottomRightHandCorner))
             for a in _read(data).GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert len(boxes) == 86
    tops = [top[1] for top, _ in boxes]
    assert tops == sorted(tops) and boxes[-1][1][1] <= 1.0
    assert all(bottom[1] <= next_top + 1e-6 for (_, bottom), next_top in zip(boxes, tops[1:]))


def test_colours_are_distinct_and_bright() -> None:
    assert len(set(COLOURS)) == len(COLOURS)
    assert all(max(c) == 255 for c in COLOURS)


def test_multipart_gsps_is_one_part(client: TestClient) -> None:
    r = _post(client, PHANTOM.read_bytes(), MULTIPART, dicom="gsps", **PARAMS)
    assert r.status_code == 200, r.text
    (part,) = multipart_parts(r)
    assert _read(part).SOPClassUID == GrayscaleSoftcopyPresentationStateStorage


def test_gsps_needs_a_grey_dicom_image_of_a_current_class(client: TestClient) -> None:
    r = client.post("/explain", content=phantom_bytes("normal.png"), params={"dicom": "gsps"},
                    headers={"content-type": "image/png", "accept": DICOM})
    body = assert_problem(r, 406, "not_acceptable")
    assert "this upload is png" in str(body["detail"])
    # A colour radiograph: the phantom in RGB.
    ds = pydicom.dcmread(PHANTOM)
    grey = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    # Channels that differ: equal ones decode as grey.
    rgb = np.stack([grey, grey // 2, grey // 3], axis=2)
    ds.PixelData = (rgb * 255.0 / max(int(rgb.max()), 1)).astype(np.uint8).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    body = assert_problem(_post(client, buf.getvalue(), DICOM, dicom="gsps",
                                methods="gradcam"), 406, "not_acceptable")
    assert "MONOCHROME1 or MONOCHROME2" in str(body["detail"])
    assert _post(client, buf.getvalue(), DICOM, dicom="sc",
                 methods="gradcam").status_code == 200
    # Asked with others, the 406 names only what cannot be made of this image.
    detail = str(assert_problem(_post(client, buf.getvalue(), MULTIPART, dicom="sc,gsps",
                                      methods="gradcam"), 406, "not_acceptable")["detail"])
    assert "dicom=gsps: a grey" in detail and "dicom=sc" not in detail, detail
    # A retired SOP Class, which highdicom has no IOD of.
    ds = pydicom.dcmread(PHANTOM)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6"
    buf = io.BytesIO()
    ds.save_as(buf)
    body = assert_problem(_post(client, buf.getvalue(), DICOM, dicom="gsps",
                                methods="gradcam"), 406, "not_acceptable")
    assert "not a retired or private one" in str(body["detail"])
