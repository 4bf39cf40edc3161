"""A Grayscale Softcopy Presentation State (GSPS) that shows the explanations over the
source image itself, in any viewer that applies presentation states.

Captures (service.outputs.secondary_capture) are new pictures; a presentation state is a
set of instructions for displaying the radiograph already in the PACS: the viewer draws
the source's own pixels at full fidelity and puts the annotations over them, each
explanation on a graphic layer of its own that a reader can switch on and off. One GSPS
per request, in a new series of the source study, references the source image (and the
frame explained, for a multi-frame source) and holds, per explanation (one layer, in the
order of the answer, each its own recommended colour):

- each region as a closed ``POLYLINE``: the outline of the region's cells on the grid it
  was found on (:class:`~service.methods.regions.Region`), or its box for a region one
  cell wide;
- CNN Fixations' points as ``POINT`` graphics;
- a line of the legend, top left in DISPLAY units: method, label, score, regions.

A last layer names the model and the service, and says when the model is a demo, not for
diagnosis. Coordinates are PIXEL units (PS3.3 C.10.5.1.2): (column, row) with (0, 0) the
top-left corner of the top-left pixel, as in the SR (service.outputs.structured_report).

What the viewer displays is what the network was shown: the source's Modality LUT and, as
the VOI, the caller's ``window`` or the min-max scaling the decoder used (as the LINEAR
windows equal to the LINEAR_EXACT ones it applied), else the file's first VOI LUT or
window; MONOCHROME1 sources get the INVERSE Presentation LUT Shape, so bone is bright as
in every answer.
Only grey sources: a presentation state of a colour image is another IOD (Color Softcopy
Presentation State), not written here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Final

import cv2
import numpy as np
from highdicom._standard_utils import is_attribute_in_iod
from highdicom.color import CIELabColor
from highdicom.content import PresentationLUTTransformation
from highdicom.enum import PresentationLUTShapeValues
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextJustificationValues,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds

from service import __version__
from service.imaging.base import DecodedImage
from service.imaging.dicom import frame_view
from service.methods.regions import Region
from service.outputs.base import DicomOutput, Encoded, Packaging, not_for_diagnosis
from service.outputs.secondary_capture import (
    MANUFACTURER,
    _ascii,
    _laterality,
    referenced_frames,
)
from service.outputs.structured_report import (
    NOT_FOR_DIAGNOSIS,
    is_reportable,
    new_series,
    rectangle,
    series_description,
    source_header,
    written,
)
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import Map, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams

__all__ = ["COLOURS", "SERIES_BASE", "PresentationState", "is_presentable",
           "presentation_state"]

# After the SRs' 9930-9936: one number per method of a one-method presentation state
# (9951 crm ... 9956 fixations), 9950 for one of several methods.
SERIES_BASE: Final[int] = 9950

COLOURS: Final[tuple[tuple[int, int, int], ...]] = (
    (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0),
    (128, 128, 255), (255, 64, 64), (255, 255, 255),
)
"""The layers' recommended colours (sRGB), in turn: bright, far apart, none of them grey."""

_GREY: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})
_LEGEND_TOP: Final[float] = 0.01
_LEGEND_LINE: Final[float] = 0.035  # of the displayed area's height per line
# Type 1 in the Presentation State Identification Module; CS, at most 16 characters.
_CONTENT_LABEL: Final[str] = "MEDEXPLAIN"


def is_presentable(image: DecodedImage) -> bool:
    """Whether a GSPS can reference the image: as for an SR (a study and series to join, a
    SOP Class of the standard's current edition, whose IOD highdicom reads), and grey."""
    return is_reportable(image) and image.meta.get("PhotometricInterpretation") in _GREY


def presentation_state(image: DecodedImage, maps: Sequence[Map], legends: Sequence[str], *,
                       model: str, model_version: str, not_for_diagnosis: bool = False,
                       frame: int = 0) -> bytes:
    """One GSPS of the maps' regions and points over the source image.

    Args:
        image: the decoded DICOM upload; :func:`is_presentable` must hold.
        maps: the explanations, one graphic layer each, in order.
        legends: each map's line of the legend.
        model, model_version: the model, for the last legend line and the equipment.
        not_for_diagnosis: whether the model is a demo (said in the legend and series).
        frame: the 0-based frame that was decoded, referenced when the source has several.

    Returns:
        The presentation state as a DICOM file (Part 10, Explicit VR Little Endian).
    """
    if not is_presentable(image):
        raise ValueError("the image is no grey DICOM image with a study and series to join")
    source = image.source
    assert source is not None
    header = _referenced(image)
    frames = referenced_frames(image)
    coloured = [(m.method, legend, COLOURS[k % len(COLOURS)], _graphics(m, image))
                for k, (m, legend) in enumerate(zip(maps, legends, strict=True))]
    footer = _ascii(f"{MANUFACTURER} {__version__}  model {model[:64]} v{model_version[:64]}"
                    + (f"  {NOT_FOR_DIAGNOSIS.upper()}" if not_for_diagnosis else ""))
    layers: list[GraphicLayer] = []
    annotations: list[GraphicAnnotation] = []
    for number, (name, line, colour, graphics) in enumerate(
            [*coloured, (MANUFACTURER, footer, (255, 255, 255), [])], start=1):
        layer = GraphicLayer(layer_name=_layer_name(number, name), order=number,
                             description=line[:64], display_color=_cielab(colour))
        annotation = GraphicAnnotation(
            referenced_images=[header],
            graphic_layer=layer,
            graphic_objects=graphics or None,
            text_objects=[_legend(line, number, len(coloured) + 1)],
        )
        if frames > 1:
            # The header highdicom sees has one frame (its LUT attributes flattened for
            # the frame explained); the annotations belong to that frame alone.
            annotation.ReferencedImageSequence[0].ReferencedFrameNumber = frame + 1
        layers.append(layer)
        annotations.append(annotation)
    methods = [m.method for m in maps]
    description = series_description("regions", methods, not_for_diagnosis)
    # highdicom logs, at info and debug level, what it copies from the referenced image.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        **new_series(SERIES_BASE, methods, model, model_version, __version__),
        device_serial_number=None,  # type: ignore[arg-type]  # Type 3: software has none
        content_label=_CONTENT_LABEL,
        content_description=description,
        graphic_annotations=annotations,
        graphic_layers=layers,
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=PresentationLUTShapeValues.INVERSE
            if image.meta.get("PhotometricInterpretation") == "MONOCHROME1"
            else PresentationLUTShapeValues.IDENTITY),
    )
    gsps.update(_display(image, frame))
    gsps.SeriesDescription = description
    gsps.Laterality = _laterality(source)
    return written(gsps, source)


def _referenced(image: DecodedImage) -> Dataset:
    """What highdicom reads of the source (:func:`source_header`), and no LUT attributes
    (for highdicom to copy none: see :func:`_display`)."""
    header = source_header(image)
    if is_attribute_in_iod("NumberOfFrames", header.SOPClassUID):
        # highdicom looks for the LUTs of a multi-frame class in its functional groups.
        header.SharedFunctionalGroupsSequence = [Dataset()]
        header.PerFrameFunctionalGroupsSequence = []
    return header


def _display(image: DecodedImage, frame: int) -> Dataset:
    """The Modality LUT and Softcopy VOI LUT modules: the pipeline decode_dicom applied.

    Written here, not by highdicom, which copies Rescale but no Modality LUT Sequence, and
    every window of a file where the decoder used the first. The frame's values
    (frame_view: top level, shared and per-frame functional groups) apply to the whole
    presentation state, which references that frame alone.
    """
    source = image.source
    assert source is not None
    view = frame_view(source, frame)
    display = Dataset()
    if view.get("ModalityLUTSequence"):
        display.ModalityLUTSequence = [view.ModalityLUTSequence[0]]
    elif "RescaleSlope" in view or "RescaleIntercept" in view:
        display.RescaleIntercept = view.get("RescaleIntercept", 0)
        display.RescaleSlope = view.get("RescaleSlope", 1)
        # Type 1 here; US: unspecified, as highdicom and DCMTK write it.
        display.RescaleType = str(view.get("RescaleType", "") or "US")
    voi = Dataset()
    if image.window is not None:
        # decode_dicom's window is LINEAR_EXACT, (v - c) / w + 0.5, which not every viewer
        # implements (DCMTK 3.6 draws it as LINEAR). LINEAR with c + 0.5 and w + 1 is the
        # same function (PS3.3 C.11.2.1.2.1), and every viewer has it.
        voi.WindowCenter = _ds(image.window.center + 0.5)
        voi.WindowWidth = _ds(image.window.width + 1.0)
        voi.WindowCenterWidthExplanation = "medexplain: as the model was shown"
        voi.VOILUTFunction = "LINEAR"
    elif view.get("VOILUTSequence") and "LUTDescriptor" in view.VOILUTSequence[0] \
            and "LUTData" in view.VOILUTSequence[0]:  # as decode_dicom takes a table
        voi.VOILUTSequence = [view.VOILUTSequence[0]]
    elif "WindowCenter" in view and "WindowWidth" in view:
        voi.WindowCenter = _first(view.WindowCenter)
        voi.WindowWidth = _first(view.WindowWidth)
        if "VOILUTFunction" in view:
            voi.VOILUTFunction = view.VOILUTFunction
    if len(voi):
        display.SoftcopyVOILUTSequence = [voi]
    return display


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DS)."""
    return format_number_as_ds(float(value))


def _first(value: object) -> object:
    return value[0] if isinstance(value, MultiValue) else value


def _graphics(m: Map, image: DecodedImage) -> list[GraphicObject]:
    """The map's regions as closed polylines and its points as points, in PIXEL units."""
    graphics = [GraphicObject(graphic_type=GraphicTypeValues.POLYLINE,
                              graphic_data=_closed(region),
                              units=AnnotationUnitsValues.PIXEL) for region in m.regions]
    if m.points is not None:
        # Points are in pixel indices (a pixel's centre at its index); DICOM puts the
        # top-left pixel's centre at (0.5, 0.5).
        xy = np.asarray(m.points, dtype=np.float64) + 0.5
        xy = np.clip(xy, 0.0, [float(image.width), float(image.height)])
        graphics += [GraphicObject(graphic_type=GraphicTypeValues.POINT,
                                   graphic_data=point[None, :],
                                   units=AnnotationUnitsValues.PIXEL) for point in xy]
    return graphics


def _closed(region: Region) -> np.ndarray:
    """The region's outline, closed, or its box where the outline encloses nothing."""
    outline = region.outline
    if outline is None or len(np.unique(outline, axis=0)) < 3:
        return rectangle(region.box)
    return np.vstack([outline, outline[:1]])


def _legend(line: str, number: int, lines: int) -> TextObject:
    """Line ``number`` of ``lines`` of the legend, top left; many lines share the height
    (DISPLAY units end at 1)."""
    height = min(_LEGEND_LINE, (1.0 - 2 * _LEGEND_TOP) / lines)
    top = _LEGEND_TOP + (number - 1) * height
    return TextObject(
        text_value=line,
        units=AnnotationUnitsValues.DISPLAY,
        bounding_box=(0.01, top, 0.99, top + height),
        text_justification=TextJustificationValues.LEFT,
    )


def _layer_name(number: int, method: str) -> str:
    """Graphic Layer is CS: at most 16 upper-case letters, digits, spaces and _; highdicom
    also wants a letter first (method names start with one)."""
    suffix = f" {number}"
    return method.upper()[: 16 - len(suffix)] + suffix


def _cielab(rgb: tuple[int, int, int]) -> CIELabColor:
    pixel = np.array([[rgb]], dtype=np.float32) / 255.0
    lab = cv2.cvtColor(pixel, cv2.COLOR_RGB2Lab)[0, 0]
    return CIELabColor(float(lab[0]), float(lab[1]), float(lab[2]))


def _legend_line(m: Map, result: Result) -> str:
    label = result.label(m.index)
    score = result.score(m.index)
    regions = len(m.regions)
    text = (f"{m.method}  {label if label is not None else 'all classes'}"
            + ("" if score is None else f"  score {score:.3f}")
            + f"  {regions} region{'s' if regions != 1 else ''}"
            + ("" if m.points is None else f", {len(m.points)} points"))
    return _ascii(text)[:1024]  # ST


class PresentationState(DicomOutput):
    """``dicom=gsps``: one Grayscale Softcopy Presentation State of every explanation's
    regions (and CNN Fixations' points) over the source image."""

    name: ClassVar[str] = "gsps"
    summary: ClassVar[str] = ("one Grayscale Softcopy Presentation State: the regions' outlines "
                              "and the fixations over the source image, a layer per map")
    needs: str = ("a grey (MONOCHROME1 or MONOCHROME2) DICOM upload with valid Study, "
                  "Series and SOP Instance UIDs (the presentation state references it in "
                  "its study) and a SOP Class of the current DICOM standard, not a retired "
                  "or private one")

    def accepts(self, image: DecodedImage) -> bool:
        return is_presentable(image)

    def objects(self, result: Result, params: ExplainParams, packaging: Packaging,
                syntax: TransferSyntax = DEFAULT) -> list[Encoded]:
        # No Pixel Data: always the default syntax (service.outputs.transfer_syntax).
        data = presentation_state(
            result.image, result.maps, [_legend_line(m, result) for m in result.maps],
            model=result.model.name, model_version=result.model.config.version,
            not_for_diagnosis=not_for_diagnosis(result.model), frame=params.frame)
        return [Encoded(data, DEFAULT)]
