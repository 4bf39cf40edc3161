"""POST /explain?dicom=seg: the explanations' regions as a binary DICOM Segmentation, checked
against the JSON answer, pixel-centre masks computed here, and dicom3tools' dciodvfy."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import cv2
import highdicom
import numpy as np
import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import SegmentationStorage

from service.imaging import decode
from service.methods import METHODS
from service.methods.regions import regions
from service.outputs.secondary_capture import PATIENT_STUDY_KEYWORDS
from service.outputs.segmentation import is_segmentable, segment_masks
from tests.api.conftest import DATA, MODELS, assert_problem, post_dicom, read_dicom
from tests.dicom_tools import dciodvfy_errors, pydicom_data

DICOM = "application/dicom"
PHANTOM = DATA / "dicom" / "phantom_nodule.dcm"
PARAMS = {"methods": "gradcam,crm_combined,fixations", "classes": "Nodule,Cardiomegaly"}
DEMO_CODES = tomllib.loads((MODELS / "demo-cxr" / "model.toml").read_text())["codes"]

_post, _read = post_dicom, read_dicom


def _errors(data: bytes, folder: Path) -> list[str]:
    return dciodvfy_errors(data, folder, "Segmentation")


def _masks(data: bytes) -> dict[int, np.ndarray]:
    """Each segment's mask on the source's grid, from the frames as written."""
    ds = _read(data)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns).astype(bool)
    masks = {int(s.SegmentNumber): np.zeros((ds.Rows, ds.Columns), bool)
             for s in ds.SegmentSequence}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        masks[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)] |= frame
    return masks


def test_a_segment_per_explanation_with_its_regions(client: TestClient, tmp_path: Path) -> None:
    data = PHANTOM.read_bytes()
    source = _read(data)
    expected = _post(client, data, None, **PARAMS).json()
    r = _post(client, data, DICOM, dicom="seg", **PARAMS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM
    assert not _errors(r.content, tmp_path)
    ds = _read(r.content)
    assert ds.SOPClassUID == SegmentationStorage and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in PATIENT_STUDY_KEYWORDS:
        assert ds.get(keyword) == source.get(keyword), keyword
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert ds.SeriesNumber == 9970
    assert ds.SeriesDescription.startswith("medexplain segments gradcam,")
    assert ds.SeriesDescription.endswith(" - demo model, not for diagnosis")
    (reference,) = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    explanations = expected["explanations"]
    segments = list(ds.SegmentSequence)
    assert len(segments) == len(explanations)
    masks = _masks(r.content)
    for segment, explanation in zip(segments, explanations, strict=True):
        label = explanation["label"]
        code = {"value": "all", "scheme": "99MEDEXPLAIN", "meaning": "all classes"} \
            if label is None else DEMO_CODES[label]
        concept = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (
            code["value"], code["scheme"], code["meaning"])
        assert segment.SegmentLabel == (f"{explanation['method']} "
                                        f"{'all' if label is None else code['meaning']}")
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentAlgorithmName == expected["model"]["name"]
        # Each region is one connected piece of the mask, inside its box and within a
        # pixel of each of its edges (a pixel takes the cell under its centre).
        mask = masks[int(segment.SegmentNumber)]
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
        pieces = sorted((x, y, x + w, y + h) for x, y, w, h in stats[1:count, :4])
        boxes = sorted(tuple(region["box"]) for region in explanation["regions"])
        assert len(pieces) == len(boxes)
        for piece, box in zip(pieces, boxes, strict=True):
            assert all(abs(a - b) <= 1 for a, b in zip(piece, box, strict=True)), (piece, box)
            assert box[0] <= piece[0] and box[1] <= piece[1]
            assert piece[2] <= box[2] and piece[3] <= box[3]


def test_one_method_is_its_own_series_number(client: TestClient) -> None:
    r = _post(client, PHANTOM.read_bytes(), DICOM, dicom="seg", methods="gradcam")
    assert r.status_code == 200, r.text
    assert _read(r.content).SeriesNumber == 9971 + list(METHODS).index("gradcam")


def test_masks_take_the_cell_under_each_pixel_centre() -> None:
    grid = np.zeros((4, 5), np.float32)
    grid[1:3, 1:4] = 1.0  # cells (column 1-3, row 1-2)
    grid[3, 0] = 1.0  # and one cell alone
    image = (7, 11)  # rows, columns: cells of 1.75 × 2.2 pixels
    found = regions(grid, 0.5, image[1] / 5, image[0] / 4)
    (masks,) = segment_masks([found, []], (4, 5), image)
    expected = np.zeros(image, bool)
    for row in range(image[0]):
        for col in range(image[1]):
            cell_row = int((row + 0.5) * 4 / image[0])
            cell_col = int((col + 0.5) * 5 / image[1])
            expected[row, col] = grid[cell_row, cell_col] > 0.5
    np.testing.assert_array_equal(masks[:, :, 0], expected)
    assert not masks[:, :, 1].any()  # a map without regions: an empty segment
    # A region's holes are in it: its outline filled.
    ring = np.ones((5, 5), np.float32)
    ring[2, 2] = 0.0
    (masks,) = segment_masks([regions(ring, 0.5, 2.0, 2.0)], (5, 5), (10, 10))
    assert masks.all()


def test_a_real_radiograph(client: TestClient, tmp_path: Path) -> None:
    path = pydicom_data("RG1_UNCR.dcm")  # a CR whose Pixel Spacing is 0\0
    r = _post(client, path.read_bytes(), DICOM, dicom="seg", methods="gradcam",
              classes="Nodule")
    assert r.status_code == 200, r.text
    assert not _errors(r.content, tmp_path)
    ds = _read(r.content)
    assert (ds.Rows, ds.Columns) == (1955, 1841)
    assert "PixelMeasuresSequence" not in ds.SharedFunctionalGroupsSequence[0]
    assert "FrameOfReferenceUID" not in ds
    seg = highdicom.seg.segread(io.BytesIO(r.content))
    assert seg.number_of_segments == 1 and ds.BitsAllocated == 1


def test_seg_needs_one_grey_frame_of_a_class_without_a_frame_of_reference(
        client: TestClient) -> None:
    assert is_segmentable(decode(PHANTOM.read_bytes(), DICOM))
    # CT requires a Frame of Reference; several frames; colour.
    for name in ("CT_small.dcm", "emri_small.dcm", "SC_rgb.dcm"):
        assert not is_segmentable(decode(pydicom_data(name).read_bytes(), DICOM)), name
    ds = pydicom.dcmread(PHANTOM)
    ds.NumberOfFrames = 1
    buf = io.BytesIO()
    ds.save_as(buf)
    assert is_segmentable(decode(buf.getvalue(), DICOM))
    r = client.post("/explain", content=(DATA / "phantoms" / "normal.png").read_bytes(),
                    params={"dicom": "seg"},
                    headers={"content-type": "image/png", "accept": DICOM})
    detail = str(assert_problem(r, 406, "not_acceptable")["detail"])
    assert "without a Frame of Reference" in detail and "this upload is png" in detail
