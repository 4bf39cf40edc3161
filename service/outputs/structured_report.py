"""DICOM Structured Report of explanation scores and regions, filed into the source study.

One Comprehensive 3D SR per request, following TID 1500 (Measurement Report): a device
observer (medexplain and the model), and one TID 1410 measurement group (Planar ROI
Measurements and Qualitative Evaluations) per explanation region, each with:

- the region as a closed ``POLYLINE`` rectangle (SCOORD) on the source image (Source Image
  For Region: its SOP Class / Instance UIDs, and the frame of a multi-frame source);
- a finding type: the label's code from model.toml ``[codes]`` (e.g. SCT 287272002
  "Cardiomegaly"), else coded in the local scheme ``99MEDEXPLAIN`` (value and meaning: the
  label, or ``all classes`` for a class-agnostic map), which implies no standard concept;
- the explanation method as the group's method, coded in ``99MEDEXPLAIN`` too;
- the model as Algorithm Identification (TID 4019: name and version);
- measurements ``score`` (the model's score of the label; absent for class-agnostic maps)
  and ``peak score`` (the peak of the max-normalised map inside the region), unitless
  (UCUM ``1``).

An explanation without a region (an all-zero map) gets one image-level TID 1501 group
(Measurement and Qualitative Evaluation Group, Source Image: the source) with its score, so
every explanation appears in the report.

Coordinates: a region box ``[x0, y0, x1, y1]`` (original pixels, x1 and y1 exclusive)
covers pixels x0..x1-1 and y0..y1-1. DICOM pixel coordinates (PS3.3 C.18.6.1.1) are
(column, row) with the top-left corner of the top-left pixel at (0, 0) and its centre at
(0.5, 0.5), so the outline of those whole pixels is exactly the polyline
(x0, y0) (x1, y0) (x1, y1) (x0, y1) (x0, y0): the box numbers, unchanged.

The SR joins the source study like the Secondary Captures (same Study Instance UID, Patient
and General Study attributes copied element by element by
:mod:`service.outputs.secondary_capture`'s helpers), in a new series. highdicom copies
patient attributes from its ``evidence`` with validation that logs values, so it is given
a header of UIDs only and the patient/study attributes are copied afterwards.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

import highdicom
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from service import __version__
from service.imaging.base import DecodedImage
from service.methods.regions import Region
from service.models.spec import LabelCode
from service.outputs.base import DicomOutput, Encoded, Packaging, not_for_diagnosis
from service.outputs.limit import spend
from service.outputs.secondary_capture import (
    MANUFACTURER,
    _ascii,
    _copy_patient_and_study,
    _uid,
    in_standard,
    is_capturable,
    referenced_frames,
    series_number,
)
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams

__all__ = [
    "SCHEME",
    "SERIES_BASE",
    "Finding",
    "Region",
    "Report",
    "StructuredReport",
    "is_reportable",
    "label_concept",
    "local_scheme",
    "new_series",
    "rectangle",
    "series_description",
    "source_header",
    "structured_report",
    "written",
]

SCHEME: Final[str] = "99MEDEXPLAIN"
"""Local coding scheme designator of labels, methods and measurement names."""

# After the Secondary Captures' 9910-9916: one number per method of a one-method report
# (9931 crm ... 9936 fixations, the registry's order), 9930 for a report of several.
SERIES_BASE: Final[int] = 9930

SCORE: Final[Code] = Code("score", SCHEME, "score")
PEAK_SCORE: Final[Code] = Code("peak", SCHEME, "peak score")
ALL_CLASSES: Final[Code] = Code("all", SCHEME, "all classes")
NOT_FOR_DIAGNOSIS: Final[str] = "demo model, not for diagnosis"

_LO: Final[int] = 64


def series_description(kind: str, methods: Sequence[str], not_for_diagnosis: bool) -> str:
    """``medexplain <kind> <methods>``, the demo warning last; the method list is what
    gets shortened when the whole would not fit LO's 64 characters."""
    prefix = f"{MANUFACTURER} {kind}"
    suffix = f" - {NOT_FOR_DIAGNOSIS}" if not_for_diagnosis else ""
    listed = ",".join(dict.fromkeys(methods))
    room = _LO - len(prefix) - 1 - len(suffix)
    if len(listed) > room:
        listed = listed[: room - 3] + "..."
    return _ascii(f"{prefix} {listed}{suffix}")


@dataclass(frozen=True)
class Finding:
    """One explanation: its method, label (None: class-agnostic), the label's score, its
    regions (box in original pixels, x1 and y1 exclusive; score: the map's peak), and the
    label's code in a standard scheme when the model gives one."""

    method: str
    label: str | None
    score: float | None
    regions: Sequence[Region]
    code: LabelCode | None = None  # the label's meaning in a standard scheme, if known


@dataclass(frozen=True)
class Report:
    """What the SR says besides the findings."""

    model: str
    model_version: str
    software_version: str
    not_for_diagnosis: bool = False


def is_reportable(image: DecodedImage) -> bool:
    """Whether an SR can join the image's study: as for a capture, plus a Series UID and a
    SOP Class of the standard's current edition.

    The SR's evidence (Current Requested Procedure Evidence) names the source's series; its
    image regions reference the source, which highdicom checks against the standard's IOD
    of the source's class (a retired class, e.g. the old Ultrasound Image Storage, failed
    there with a KeyError: a 500).
    """
    return (is_capturable(image) and "SeriesInstanceUID" in image.meta
            and in_standard(str(_uid(image.source, "SOPClassUID"))))


def rectangle(box: Sequence[int]) -> np.ndarray:
    """The closed polyline (column, row) outlining a box's pixels; see the module doc."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])


def structured_report(image: DecodedImage, findings: Sequence[Finding], report: Report, *,
                      frame: int = 0) -> bytes:
    """A Comprehensive 3D SR (TID 1500) of the findings, in a new series of the source study.

    Args:
        image: the decoded DICOM upload; :func:`is_reportable` must hold.
        findings: the explanations, in order; each region becomes one measurement group.
        report: model and software identification.
        frame: the 0-based frame that was decoded, referenced when the source has several.

    Returns:
        The SR as a DICOM file (Part 10, Explicit VR Little Endian).
    """
    if not is_reportable(image):
        raise ValueError("the image has no DICOM source study and series to join")
    source = image.source
    assert source is not None
    evidence = source_header(image)
    frames = referenced_frames(image)
    reference = SourceImageForRegion(
        referenced_sop_class_uid=evidence.SOPClassUID,
        referenced_sop_instance_uid=evidence.SOPInstanceUID,
        referenced_frame_numbers=[frame + 1] if frames > 1 else None,
    )
    algorithm = AlgorithmIdentification(name=_lo(report.model),
                                        version=_lo(report.model_version))
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations
                 | MeasurementsAndQualitativeEvaluations] = []
    for finding in findings:
        finding_type = label_concept(finding.label, finding.code)
        scores = [] if finding.score is None else [
            Measurement(name=SCORE, value=finding.score, unit=codes.UCUM.NoUnits,
                        algorithm_id=algorithm)]
        name = f"{finding.method} {finding_type.meaning}"
        for number, region in enumerate(finding.regions, start=1):
            peak = Measurement(name=PEAK_SCORE, value=region.score, unit=codes.UCUM.NoUnits,
                               algorithm_id=algorithm)
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"{name} region {number}"),
                referenced_region=ImageRegion(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=rectangle(region.box),
                    source_image=reference,
                ),
                finding_type=finding_type,
                method=_code(finding.method),
                algorithm_id=algorithm,
                measurements=[*scores, peak],
            ))
        if not finding.regions:
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"{name} image"),
                finding_type=finding_type,
                method=_code(finding.method),
                algorithm_id=algorithm,
                measurements=scores or None,
                source_images=[SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=evidence.SOPClassUID,
                    referenced_sop_instance_uid=evidence.SOPInstanceUID,
                    referenced_frame_numbers=[frame + 1] if frames > 1 else None,
                )],
            ))
    if not groups:
        raise ValueError("no explanation to report")
    observer = DeviceObserverIdentifyingAttributes(
        # Stable per model and version: the same "device" across reports.
        uid=generate_uid(entropy_srcs=[MANUFACTURER, report.model, report.model_version]),
        name=_lo(f"{MANUFACTURER} {report.model}"),
        manufacturer_name=MANUFACTURER,
        model_name=_lo(report.model),
    )
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=observer,
        )),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    methods = [f.method for f in findings]
    description = series_description("findings", methods, report.not_for_diagnosis)
    # highdicom logs, at info level, the UIDs of the evidence it copies from (the
    # upload's); its modules' loggers take their level from this one.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    sr = Comprehensive3DSR(
        evidence=[evidence],
        content=content,
        **new_series(SERIES_BASE, methods, report.model, report.model_version,
                     report.software_version),
        series_description=description,
        is_complete=True,
    )
    sr.CodingSchemeIdentificationSequence = [local_scheme()]
    return written(sr, source)


def new_series(base: int, methods: Sequence[str], model: str, model_version: str,
               software_version: str) -> dict[str, object]:
    """What every object derived with highdicom starts with: a new series (its number
    from ``base`` and the methods, :func:`series_number`), its one instance, and the
    equipment that made it (the service and the model)."""
    return {
        "series_instance_uid": highdicom.UID(),
        "series_number": series_number(base, methods),
        "sop_instance_uid": highdicom.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": _lo(model),
        "software_versions": _lo(f"{software_version} model {model_version}"),
    }


def written(dataset: Dataset, source: Dataset) -> bytes:
    """A derived object joined to its source's patient and study (their attributes copied
    as present) as a Part 10 file, counted against the answer's limit."""
    _copy_patient_and_study(source, dataset)
    buf = io.BytesIO()
    dcmwrite(buf, dataset, enforce_file_format=True)
    spend(buf.tell())
    return buf.getvalue()


def source_header(image: DecodedImage) -> Dataset:
    """The source as highdicom is shown it: its UIDs, size and one sample per pixel, with
    the patient and study attributes highdicom copies present but empty (it validates
    what it copies, logging invalid values; :func:`_copy_patient_and_study` copies them
    afterwards without)."""
    assert image.source is not None
    header = Dataset()
    header.StudyInstanceUID = str(image.meta["StudyInstanceUID"])
    header.SeriesInstanceUID = str(image.meta["SeriesInstanceUID"])
    header.SOPInstanceUID = str(image.meta["SOPInstanceUID"])
    header.SOPClassUID = _uid(image.source, "SOPClassUID")
    header.Rows = image.height
    header.Columns = image.width
    header.SamplesPerPixel = 1
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):
        setattr(header, keyword, None)
    return header


def label_concept(label: str | None, code: LabelCode | None) -> Code:
    """What a label means: its code from model.toml ``[codes]``, else the label in the
    local scheme; ``all classes`` for a class-agnostic map."""
    if label is None:
        return ALL_CLASSES
    return _code(label) if code is None else Code(code.value, code.scheme, code.meaning)


def local_scheme() -> Dataset:
    """The local coding scheme's item of the Coding Scheme Identification Sequence: local
    schemes are identified in the SOP Common Module (PS3.3 C.12.1.1.1)."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "medexplain labels, methods and measurements"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    return scheme


def _tracking(identifier: str) -> TrackingIdentifier:
    return TrackingIdentifier(uid=highdicom.UID(), identifier=_lo(identifier))


def _code(text: str) -> Code:
    """A local code: value and meaning both the text (SH value, LO meaning)."""
    value = _ascii(text).strip() or "?"
    return Code(value, SCHEME, value[:64])


def _lo(text: str) -> str:
    return _ascii(text)[:64]


class StructuredReport(DicomOutput):
    """``dicom=sr``: one Comprehensive 3D SR (TID 1500) of every explanation's regions."""

    name: ClassVar[str] = "sr"
    summary: ClassVar[str] = ("one Comprehensive 3D SR (TID 1500) with a measurement group "
                              "per region")
    needs: str = ("a DICOM upload with valid Study, Series and SOP Instance UIDs "
                  "(the Structured Report joins its study) and a SOP Class of the "
                  "current DICOM standard, not a retired or private one")

    def accepts(self, image: DecodedImage) -> bool:
        return is_reportable(image)

    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        # No Pixel Data, so nothing for a compressed syntax to compress: always the default
        # (service.outputs.transfer_syntax).
        codes = result.model.config.codes
        findings = [Finding(
            method=m.method,
            label=(label := result.label(m.index)),
            score=result.score(m.index),
            regions=m.regions,
            code=None if label is None else codes.get(label),
        ) for m in result.maps]
        report = Report(model=result.model.name, model_version=result.model.config.version,
                        software_version=__version__,
                        not_for_diagnosis=not_for_diagnosis(result.model))
        return [Encoded(structured_report(result.image, findings, report, frame=params.frame),
                        DEFAULT)]
