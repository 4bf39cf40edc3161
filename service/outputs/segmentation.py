"""A DICOM Segmentation (SEG) of the explanations' regions, in the source study.

A SEG is DICOM's object for region masks: masks on the source's own pixel grid that
viewers overlay and that other software can measure. One BINARY Segmentation per request,
one segment per explanation (in the order of the answer): the cells of its regions on the
network's input grid (:class:`~service.methods.regions.Region`: their outlines filled, so
a region's holes are in it), each image pixel taking the cell under its centre. A segment
is labelled ``<method> <label>``; its property type is the label's code from model.toml
``[codes]`` (else the label in the local scheme ``99MEDEXPLAIN``, or ``all classes``), its
category "Morphologically abnormal structure" (SCT 49755003), its algorithm the model
(AUTOMATIC, family Artificial Intelligence). An explanation without a region is a segment
without frames.

Sources: single-frame grey images whose class does not require a Frame of Reference (CR,
DX, and the like; the SEG then has none, and no plane positions), as the bundled model
takes. highdicom is
given a header of UIDs and size only (it would copy, and validate, patient attributes and
a radiograph's Pixel Spacing of 0\\0); the patient and study attributes are copied after.
The frames are 1 bit per pixel, Explicit VR Little Endian.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Final

import cv2
import highdicom
import numpy as np
from highdicom._standard_utils import ModuleUsageValues, get_module_usage
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service import __version__
from service.imaging.base import DecodedImage
from service.methods.regions import Region
from service.models.spec import LabelCode
from service.outputs.base import DicomOutput, Encoded, Packaging, not_for_diagnosis
from service.outputs.limit import held
from service.outputs.presentation_state import is_presentable
from service.outputs.secondary_capture import (
    MANUFACTURER,
    _ascii,
    _laterality,
    _patient_orientation,
    _uid,
)
from service.outputs.structured_report import (
    label_concept,
    local_scheme,
    new_series,
    series_description,
    source_header,
    written,
)
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import Map, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams

__all__ = ["SERIES_BASE", "Segments", "is_segmentable", "segment_masks", "segmentation"]

# After the presentation states' 9950-9956: 9971 crm ... 9976 fixations for one method,
# 9970 for several.
SERIES_BASE: Final[int] = 9970



def is_segmentable(image: DecodedImage) -> bool:
    """Whether a SEG can be made of the image: as for a presentation state (grey, a study
    and series to join, a current SOP Class), one frame, and a class that needs no Frame of
    Reference."""
    if not is_presentable(image) or int(image.meta.get("frames", 1)) != 1:
        return False
    assert image.source is not None
    sop_class = _uid(image.source, "SOPClassUID")
    return sop_class is not None and get_module_usage(
        "frame-of-reference", sop_class) != ModuleUsageValues.MANDATORY


def segment_masks(regions: Sequence[Sequence[Region]], grid: tuple[int, int],
                  image: tuple[int, int]) -> np.ndarray:
    """Each map's regions as a mask on the image's pixels.

    Args:
        regions: each map's regions, with outlines on ``grid``.
        grid: (height, width) of the grid the regions were found on.
        image: (height, width) of the image.

    Returns:
        bool (1, height, width, maps): a pixel is in a map's segment when the cell under
        its centre is in one of the map's regions (outlines filled).
    """
    (gh, gw), (h, w) = grid, image
    # The cell under each pixel's centre, by rows and by columns.
    rows = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(np.intp), gh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(np.intp), gw - 1)
    masks = np.zeros((1, h, w, len(regions)), dtype=bool)
    scale = np.array([w / gw, h / gh])
    for k, found in enumerate(regions):
        cells = np.zeros((gh, gw), np.uint8)
        for region in found:
            if region.outline is None:
                continue
            centres = np.rint(region.outline / scale - 0.5).astype(np.int32)
            cv2.fillPoly(cells, [centres.reshape(-1, 1, 2)], 1)
        masks[0, :, :, k] = cells.astype(bool).take(rows, axis=0).take(cols, axis=1)
    return masks


def segmentation(image: DecodedImage, maps: Sequence[Map], labels: Sequence[str | None],
                 label_codes: Sequence[LabelCode | None], grid: tuple[int, int], *,
                 model: str, model_version: str, not_for_diagnosis: bool = False) -> bytes:
    """One binary SEG, a segment per map, in a new series of the source study.

    Args:
        image: the decoded DICOM upload; :func:`is_segmentable` must hold.
        maps: the explanations, one segment each, in order.
        labels, label_codes: each map's label (None: class-agnostic) and its code.
        grid: (height, width) of the network input the regions were found on.
        model, model_version: the segments' algorithm.
        not_for_diagnosis: whether the model is a demo (said in the series description).

    Returns:
        The Segmentation as a DICOM file (Part 10, Explicit VR Little Endian).
    """
    if not is_segmentable(image):
        raise ValueError("the image is no single-frame grey DICOM image to segment")
    source = image.source
    assert source is not None
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name=_ascii(model)[:64], version=_ascii(model_version)[:64],
        family=codes.cid7162.ArtificialIntelligence)
    descriptions = [SegmentDescription(
        segment_number=number,
        segment_label=_ascii(f"{m.method} {concept.meaning if label is not None else 'all'}")[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=concept,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    ) for number, (m, label, code) in enumerate(zip(maps, labels, label_codes, strict=True),
                                                start=1)
        for concept in [label_concept(label, code)]]
    methods = [m.method for m in maps]
    description = series_description("segments", methods, not_for_diagnosis)
    # highdicom logs, at info and debug level, what it copies from the source.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # The masks take a byte per pixel and map until highdicom has packed them to bits.
    with held(image.height * image.width * len(maps)):
        masks = segment_masks([m.regions for m in maps], grid, (image.height, image.width))
        seg = Segmentation(
            source_images=[_referenced(image)],
            pixel_array=masks,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            **new_series(SERIES_BASE, methods, model, model_version, __version__),
            device_serial_number=MANUFACTURER,  # Type 1 in the Enhanced General Equipment
            content_description=description,
            series_description=description,
        )
        del masks
    seg.CodingSchemeIdentificationSequence = [local_scheme()]
    orientation = _patient_orientation(source)
    seg.PatientOrientation = list(orientation) if orientation is not None else ""
    if laterality := _laterality(source):  # Type 2C here: only for a paired body part
        seg.Laterality = laterality
    return written(seg, source)


def _referenced(image: DecodedImage) -> Dataset:
    """What highdicom reads of the source (:func:`source_header`) and, for a SEG, its
    modality and grey pixels; no Pixel Spacing, which a radiograph may give as 0\\0."""
    header = source_header(image)
    header.Modality = str(image.meta.get("Modality", "OT"))  # read by highdicom's checks
    header.PhotometricInterpretation = "MONOCHROME2"
    header.BitsAllocated = 16
    return header


class Segments(DicomOutput):
    """``dicom=seg``: one binary Segmentation, a segment per explanation's regions."""

    name: ClassVar[str] = "seg"
    summary: ClassVar[str] = ("one binary Segmentation: a segment per map, its regions on "
                              "the source's pixels")
    needs: str = ("a single-frame grey (MONOCHROME1 or MONOCHROME2) DICOM upload of a "
                  "class without a Frame of Reference (CR, DX, ...), with valid Study, "
                  "Series and SOP Instance UIDs (the Segmentation joins its study) and a "
                  "SOP Class of the current DICOM standard")

    def accepts(self, image: DecodedImage) -> bool:
        return is_segmentable(image)

    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        # 1-bit frames: written uncompressed whatever the Accept header's syntax (the
        # part's media type says so).
        codes_ = result.model.config.codes
        labels = [result.label(m.index) for m in result.maps]
        data = segmentation(
            result.image, result.maps, labels,
            [None if label is None else codes_.get(label) for label in labels],
            grid=result.model.grid,
            model=result.model.name, model_version=result.model.config.version,
            not_for_diagnosis=not_for_diagnosis(result.model))
        return [Encoded(data, DEFAULT)]
