"""DICOM Secondary Capture of explanations, filed into the source study.

Each explanation becomes one RGB Secondary Capture Image (PS3.3 A.8.1): the map in colour
over the image at the image's own pixel grid (``render.Canvas.overlay``, the same picture as
a JSON overlay at ``size=original``), above a caption panel
with the method, label, score, model and a colour bar. The instances of one request form one
new series in the source study: same Study Instance UID and Patient / General Study
attributes, new Series and SOP Instance UIDs, and a Source Image Sequence pointing at the
source instance.

Patient and study attributes are copied element by element from the source header rather
than passed to highdicom's constructor: highdicom checks person names by warning and logging
the name verbatim, and pydicom's value validation does the same with invalid values, so
the copy decodes the raw bytes itself with validation off. Nothing here logs a value.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Final

import cv2
import highdicom
import numpy as np
from highdicom._standard_utils import (  # the tables highdicom checks references with
    get_sop_class_iod_map,
    is_attribute_in_iod,
)
from pydicom import config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from service import __version__
from service.errors import NotAcceptable
from service.imaging.base import DecodedImage
from service.methods import METHODS
from service.outputs.base import DicomOutput, Encoded, Packaging, not_for_diagnosis
from service.outputs.limit import spend
from service.outputs.render import Canvas
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import ExplainOptions, Map, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams
    from service.models.repository import Served

__all__ = [
    "MANUFACTURER",
    "Caption",
    "Explained",
    "SecondaryCaptures",
    "capture_series",
    "is_capturable",
    "render",
    "series_number",
]

MANUFACTURER: Final[str] = "medexplain"
"""Manufacturer of every instance this module writes (PACS bridges skip their own output)."""

# Series Number is Type 2 in General Series but highdicom needs a positive integer. High
# numbers sort derived series after the acquired ones in most viewers; one number per kind
# of output and method (see series_number) tells a study's explanations apart at a glance.
SERIES_BASE: Final[int] = 9910


def series_number(base: int, methods: Sequence[str]) -> int:
    """The Series Number of a derived series holding the maps of ``methods``.

    ``base + 1 +`` the method's place in the method registry for a one-method series (the
    captures: crm 9911, crm_combined 9912, gradcam 9913, guided_backprop 9914,
    guided_gradcam 9915, fixations 9916), ``base`` itself for a series of several methods.
    """
    distinct = list(dict.fromkeys(methods))
    if len(distinct) == 1 and distinct[0] in METHODS:
        return base + 1 + list(METHODS).index(distinct[0])
    return base

# Patient and General Study attributes copied from the source, as present.
PATIENT_STUDY_KEYWORDS: Final[tuple[str, ...]] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
)

# CID 7202 "Source Image Purposes of Reference".
_PURPOSE: Final[tuple[str, str, str]] = (
    "121322", "DCM", "Source image for image processing operation"
)
_ORIENTATION: Final[frozenset[str]] = frozenset("AFHLPR")
_UTF8: Final[str] = "ISO_IR 192"
_MAX_ROWS: Final[int] = 65535  # Rows is US

_BACKGROUND: Final[tuple[int, int, int]] = (24, 24, 24)
_TEXT: Final[tuple[int, int, int]] = (255, 255, 255)
_MUTED: Final[tuple[int, int, int]] = (190, 190, 190)
_WARNING: Final[tuple[int, int, int]] = (255, 200, 0)
_FONT: Final[int] = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Caption:
    """What is burned in under the image: nothing about the patient, only the explanation."""

    method: str
    label: str | None
    score: float | None
    model: str
    model_version: str
    software_version: str
    not_for_diagnosis: bool = False

    def lines(self) -> list[tuple[str, tuple[int, int, int]]]:
        label = self.label if self.label is not None else "all classes"
        score = "" if self.score is None else f"  score {self.score:.3f}"
        lines = [
            (f"{self.method}  {label}{score}", _TEXT),
            (f"model {self.model} v{self.model_version}  medexplain {self.software_version}",
             _MUTED),
        ]
        if self.not_for_diagnosis:
            lines.append(("synthetic demo model - NOT FOR DIAGNOSIS", _WARNING))
        return [(_ascii(text), colour) for text, colour in lines]


@dataclass(frozen=True)
class Explained:
    """One explanation to capture: the raw map on its own grid, its caption, and whether
    it is a pixel-level gradient map (drawn as its local magnitude)."""

    heatmap: np.ndarray
    caption: Caption
    gradient: bool = False


def referenced_frames(image: DecodedImage) -> int:
    """How many frames a reference to the source may name: its Number of Frames where its
    SOP Class is a multi-frame one, else 1 (Referenced Frame Number is then not allowed,
    PS3.3 C.12.1.1.5: some files carry several frames under a single-frame class)."""
    frames = int(image.meta.get("frames", 1))
    sop_class = _uid(image.source, "SOPClassUID") if image.source is not None else None
    if frames > 1 and sop_class is not None and in_standard(sop_class):
        return frames if is_attribute_in_iod("NumberOfFrames", sop_class) else 1
    return frames


def in_standard(sop_class: str) -> bool:
    """Whether the SOP Class is one of the standard's current edition, which highdicom
    reads its IODs from (retired and private classes are not)."""
    return sop_class in get_sop_class_iod_map()


def is_capturable(image: DecodedImage) -> bool:
    """Whether a Secondary Capture can join the image's source study.

    True for DICOM input whose Study and SOP Instance UIDs are valid (the decoder keeps only
    valid UIDs in ``meta``) and whose SOP Class UID is present.
    """
    return (
        image.source is not None
        and "StudyInstanceUID" in image.meta
        and "SOPInstanceUID" in image.meta
        and _uid(image.source, "SOPClassUID") is not None
    )


def render(picture: np.ndarray, caption: Caption) -> np.ndarray:
    """The picture (RGB uint8, the map over the image) above the caption panel.

    Returns:
        RGB uint8 of shape (H + panel height, W, 3); the first H rows are ``picture``.
    """
    return np.vstack([picture, _panel(picture.shape[1], caption)])


def capture_series(image: DecodedImage, explained: Sequence[Explained], *,
                   software_version: str, frame: int = 0,
                   syntax: TransferSyntax = DEFAULT) -> list[bytes]:
    """One Secondary Capture per explanation, in one new series of the source study per
    method (its own Series Number and Description, see :func:`series_number`).

    Args:
        image: the decoded DICOM upload; :func:`is_capturable` must hold.
        explained: the maps (each on its own grid) and captions, in instance order.
        software_version: the service version, for Software Versions.
        frame: the 0-based frame that was decoded, referenced when the source has several.
        syntax: the transfer syntax of the Pixel Data.

    Returns:
        Each instance as a DICOM file (Part 10, in ``syntax``).

    Raises:
        NotAcceptable: the image is too tall to fit a capture with its caption.
    """
    if not is_capturable(image):
        raise ValueError("the image has no DICOM source study to join")
    source = image.source
    assert source is not None
    series: dict[str, tuple[str, str, int]] = {}  # method -> UID, description, number
    for method in dict.fromkeys(e.caption.method for e in explained):
        captions = [e.caption for e in explained if e.caption.method == method]
        series[method] = (highdicom.UID(), _series_description(captions),
                          series_number(SERIES_BASE, [method]))
    instances = dict.fromkeys(series, 0)
    frames = referenced_frames(image)
    # The image's own grid only: no model-grid backdrop is ever drawn on.
    canvas = Canvas(image, image.pixels)
    out = []
    for item in explained:
        series_uid, description, series_no = series[item.caption.method]
        instances[item.caption.method] += 1
        rgb = render(canvas.overlay(item.heatmap, item.gradient, image.height, image.width,
                                    rgb=True), item.caption)
        if rgb.shape[0] > _MAX_ROWS:
            raise NotAcceptable(
                f"a Secondary Capture of this image would have {rgb.shape[0]} rows "
                f"(image and caption); DICOM allows {_MAX_ROWS}"
            )
        sc = _secondary_capture(
            source, image.meta, rgb, item.caption,
            series_uid=series_uid, series_number=series_no, series_description=description,
            instance_number=instances[item.caption.method],
            frame=frame + 1 if frames > 1 else None, software_version=software_version,
            syntax=syntax,
        )
        # The capture holds its pixels as bytes now: of a big image's picture, its RGB and
        # its dataset, only the file being written need be alive at once.
        del rgb
        out.append(_encode(sc))
        del sc
        spend(len(out[-1]))  # before the next capture: past the limit, none more
    return out


def _secondary_capture(source: Dataset, meta: dict[str, str | int], rgb: np.ndarray,
                       caption: Caption, *, series_uid: str, series_number: int,
                       series_description: str,
                       instance_number: int, frame: int | None,
                       software_version: str, syntax: TransferSyntax) -> highdicom.sc.SCImage:
    orientation = _patient_orientation(source)
    one_letter_each = orientation is not None and all(len(p) == 1 for p in orientation)
    sc = highdicom.sc.SCImage(
        pixel_array=rgb,  # highdicom converts it to the syntax's colour space
        photometric_interpretation=syntax.colour,
        transfer_syntax_uid=syntax.uid,
        bits_allocated=8,
        coordinate_system="PATIENT",
        # Patient Orientation is Type 2C: highdicom insists on one and takes one letter
        # per direction only, so an unknown orientation goes in as a placeholder and is
        # emptied below, and an oblique one (e.g. "PF", legal DICOM) is set below.
        patient_orientation=orientation if one_letter_each else ("L", "F"),
        study_instance_uid=str(meta["StudyInstanceUID"]),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=highdicom.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_ascii(caption.model)[:64],
        software_versions=_ascii(f"{software_version} model {caption.model_version}")[:64],
        series_description=series_description,
    )
    if orientation is None:
        sc.PatientOrientation = []
    elif not one_letter_each:
        sc.PatientOrientation = list(orientation)
    sc.Laterality = _laterality(source)
    sc.ConversionType = "WSD"  # workstation: derived on a computer, not digitised
    # Burned In Annotation says whether the pixels identify the patient: the caption
    # never does.
    sc.BurnedInAnnotation = "NO"
    label = caption.label if caption.label is not None else "all classes"
    sc.DerivationDescription = _ascii(
        f"medexplain {caption.method} explanation of {label} by model {caption.model}"
    )[:1024]
    sc.SourceImageSequence = [_source_reference(source, meta, frame)]
    if syntax.lossy_method is not None:
        # Type 1C once the pixels were compressed lossily (PS3.3 C.7.6.1.1.5); highdicom
        # leaves them out. The ratio: the RGB bytes over the compressed frame's.
        (compressed,) = generate_frames(sc.PixelData, number_of_frames=1)
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionRatio = f"{rgb.nbytes / len(compressed):.2f}"
        sc.LossyImageCompressionMethod = syntax.lossy_method
    _copy_patient_and_study(source, sc)
    return sc


def _source_reference(source: Dataset, meta: dict[str, str | int],
                      frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = _uid(source, "SOPClassUID")
    item.ReferencedSOPInstanceUID = str(meta["SOPInstanceUID"])
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _PURPOSE
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient / General Study attributes, as present, without validating them."""
    encodings = _encodings(source)
    unicode = False
    for keyword in PATIENT_STUDY_KEYWORDS:
        value = _text(source, keyword, encodings)
        if value is None:
            continue
        tag = Tag(keyword)
        target[tag] = DataElement(tag, dictionary_VR(tag), value,
                                  validation_mode=config.IGNORE)
        unicode = unicode or not value.isascii()
    if unicode:
        # Values were decoded from the source's character set; UTF-8 holds any of them.
        target.SpecificCharacterSet = _UTF8


def _encodings(source: Dataset) -> list[str]:
    element = source.get_item(Tag("SpecificCharacterSet"))
    if element is None or element.value is None:
        return convert_encodings(None)
    value = element.value
    if isinstance(value, bytes):
        names = [v.strip(" \x00") for v in value.decode("ascii", "replace").split("\\")]
    elif isinstance(value, (list, MultiValue)):
        names = [str(v) for v in value]
    else:
        names = [str(value)]
    return convert_encodings(names or None)


def _text(source: Dataset, keyword: str, encodings: list[str]) -> str | None:
    """An element's value as text, decoded in the source's character set; None if absent.

    Raw elements are decoded here, so pydicom never validates (and so never warns about,
    quoting it) a patient's value.
    """
    tag = Tag(keyword)
    element = source.get_item(tag)
    if element is None:
        return None
    value = element.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        if dictionary_VR(tag) == "PN":
            return str(PersonName(value, encodings, validation_mode=config.IGNORE))
        return decode_bytes(value, encodings, {0x5C}).strip(" \x00")
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _uid(source: Dataset, keyword: str) -> str | None:
    value = _text(source, keyword, ["iso8859"])
    if value is None:
        return None
    value = value.strip(" \x00")
    if 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value):
        return value
    return None


def _laterality(source: Dataset) -> str:
    """General Series' Laterality, Type 2C (paired body parts): the source's R or L, else
    empty."""
    laterality = (_text(source, "Laterality", ["iso8859"]) or "").strip()
    return laterality if laterality in ("R", "L") else ""


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    value = _text(source, "PatientOrientation", ["iso8859"])
    if not value:
        return None
    parts = tuple(p.strip() for p in value.split("\\"))
    if len(parts) == 2 and all(p and set(p) <= _ORIENTATION for p in parts):
        return parts[0], parts[1]
    return None


def _series_description(captions: Sequence[Caption]) -> str:
    methods = ",".join(dict.fromkeys(c.method for c in captions))
    labels = ",".join(dict.fromkeys(c.label or "all" for c in captions))
    return _ascii(f"{MANUFACTURER} {methods} {labels}")[:64]


def _encode(sc: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, sc, enforce_file_format=True)
    return buf.getvalue()


def _ascii(text: str) -> str:
    """Printable ASCII only: Hershey fonts have no other glyphs, LO has no control codes."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _panel(width: int, caption: Caption) -> np.ndarray:
    """The caption panel: text lines, then a JET colour bar from 0 to the map's maximum."""
    scale = max(width / 1000, 0.3)  # Hershey simplex: caps ~22 px high at scale 1
    margin = max(3, round(14 * scale))
    thickness = max(1, round(2 * scale))
    line_height = round(34 * scale)
    lines = caption.lines()
    bar_height = round(18 * scale)
    height = margin + line_height * (len(lines) + 1) + bar_height + margin
    panel = np.empty((height, width, 3), np.uint8)
    panel[:] = _BACKGROUND
    usable = width - 2 * margin
    y = margin
    for text, colour in lines:
        fitted = _fit(text, scale, thickness, usable)
        (_, text_height), _ = cv2.getTextSize(text, _FONT, fitted, thickness)
        y += line_height
        cv2.putText(panel, text, (margin, y - (line_height - text_height) // 2), _FONT,
                    fitted, colour, thickness, cv2.LINE_AA)
    # Colour bar with "0" and "max" at its ends.
    low, high = "0", "max"
    label_scale = _fit("max", scale * 0.8, thickness, usable // 4)
    (low_w, _), _ = cv2.getTextSize(low, _FONT, label_scale, thickness)
    (high_w, _), _ = cv2.getTextSize(high, _FONT, label_scale, thickness)
    gap = margin // 2 + 1
    x0 = margin + low_w + gap
    x1 = width - margin - high_w - gap
    top = y + (line_height - bar_height) // 2 + line_height // 2
    if x1 - x0 >= 8:
        ramp = np.linspace(0, 255, x1 - x0).round().astype(np.uint8)[None, :]
        bar = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        panel[top : top + bar_height, x0:x1] = bar
        baseline = top + bar_height - max(1, (bar_height - round(22 * label_scale)) // 2)
        cv2.putText(panel, low, (margin, baseline), _FONT, label_scale, _MUTED, thickness,
                    cv2.LINE_AA)
        cv2.putText(panel, high, (x1 + gap, baseline), _FONT, label_scale, _MUTED,
                    thickness, cv2.LINE_AA)
    return panel


def _fit(text: str, scale: float, thickness: int, width: int) -> float:
    """The largest scale up to ``scale`` at which ``text`` fits ``width`` pixels."""
    (text_width, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    if text_width <= width or text_width == 0:
        return scale
    return scale * width / text_width


class SecondaryCaptures(DicomOutput):
    """``dicom=sc``: the maps over the image as Secondary Captures in the source study."""

    name: ClassVar[str] = "sc"
    summary: ClassVar[str] = ("Secondary Capture(s) of the maps over the image, with a caption "
                              "and colour bar")
    full_resolution: bool = True
    needs: str = ("a DICOM upload with valid Study and SOP Instance UIDs (the "
                  "Secondary Capture joins its study)")

    def accepts(self, image: DecodedImage) -> bool:
        return is_capturable(image)

    def options(self, params: ExplainParams, model: Served,
                packaging: Packaging) -> ExplainOptions:
        options = params.options()
        if packaging is Packaging.DICOM:  # one object: the first method's first map
            options = replace(options, methods=options.methods[:1])
        return options

    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        maps = result.maps[:1] if packaging is Packaging.DICOM else result.maps
        captures = capture_series(result.image, [_explained(m, result) for m in maps],
                                  software_version=__version__, frame=params.frame,
                                  syntax=syntax)
        return [Encoded(data, syntax) for data in captures]


def _explained(m: Map, result: Result) -> Explained:
    return Explained(m.values, Caption(
        method=m.method,
        label=result.label(m.index),
        score=result.score(m.index),
        model=result.model.name,
        model_version=result.model.config.version,
        software_version=__version__,
        not_for_diagnosis=not_for_diagnosis(result.model),
    ), m.gradient)
