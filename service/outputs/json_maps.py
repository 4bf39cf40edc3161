"""JSON answers: scores, and each map as an 8-bit PNG, a float32 .npy or a colour overlay.

Maps come on the grid the request asks for (``size``): by default the network's input grid,
a few kB each, with the original image size alongside for the client to stretch them (a
browser canvas or CSS does it for free); ``size=original`` delivers them on the upload's
own pixel grid, ``size=feature`` a CAM-type map's own grid without interpolation.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from starlette.responses import Response

from schemas import (
    DicomInfo,
    ExplainResponse,
    Explanation,
    Heatmap,
    ImageInfo,
    ImagePreview,
    ModelRef,
    Prediction,
    PredictResponse,
    Region,
)
from service.errors import IncompatibleParameters
from service.imaging.base import DecodedImage
from service.methods import METHODS
from service.methods.maps import normalise, resize
from service.outputs.base import JSON, Output, Packaging
from service.outputs.limit import spend
from service.outputs.render import MEDIA_TYPES, Canvas, Encoding, Size, jpeg, npy, png, to_uint8
from service.outputs.transfer_syntax import DEFAULT, TransferSyntax
from service.pipeline import ExplainOptions, Map, Result

if TYPE_CHECKING:
    from service.api.request import ExplainParams
    from service.models.repository import Served


class JsonMaps(Output):
    name: ClassVar[str] = "json"
    summary: ClassVar[str] = "scores, maps (png, npy or overlay), regions and points as JSON"
    packagings: ClassVar[frozenset[Packaging]] = frozenset({Packaging.JSON})

    def options(self, params: ExplainParams, model: Served,
                packaging: Packaging) -> ExplainOptions:
        if params.size is Size.FEATURE:
            pixel = [m for m in params.methods if METHODS[m].grid != "feature"]
            if pixel:
                raise IncompatibleParameters(
                    f"size=feature is only for CAM-type maps; {', '.join(pixel)} "
                    "produce maps on the model's input grid"
                )
            if len(model.members) > 1:
                raise IncompatibleParameters(
                    f"size=feature needs one network; the members of ensemble {model.name!r} "
                    "each have their own feature grid (use size=model or size=original)"
                )
        return params.options()

    def render(self, result: Result, params: ExplainParams, packaging: Packaging,
               syntax: TransferSyntax = DEFAULT) -> Response:
        canvas = Canvas(result.image, result.image01)
        explanations = [_explanation(m, result, canvas, params.heatmap, params.size)
                        for m in result.maps]
        result.watch.lap("render")
        body = ExplainResponse(
            model=_model_ref(result.model),
            image=image_info(result.image),
            predictions=predictions(result),
            explanations=explanations,
            timings_ms=result.watch.total(),
            preview=_preview(result, canvas, params.size) if params.preview else None,
        )
        return json_response(body)


def json_response(body: ExplainResponse | PredictResponse) -> Response:
    """pydantic-core writes the JSON itself: no jsonable_encoder walk over big base64."""
    return Response(body.model_dump_json(), media_type=JSON, headers={"Vary": "Accept"})


def predict_response(result: Result) -> Response:
    return json_response(PredictResponse(
        model=_model_ref(result.model),
        image=image_info(result.image),
        predictions=predictions(result),
        timings_ms=result.watch.total(),
    ))


def _grid(m: Map, result: Result, size: Size) -> tuple[int, int]:
    if size is Size.ORIGINAL:
        return result.image.height, result.image.width
    if size is Size.MODEL:
        return result.model.grid
    return m.values.shape[0], m.values.shape[1]


def heatmap_bytes(m: Map, result: Result, canvas: Canvas, encoding: Encoding,
                  size: Size) -> tuple[bytes, int, int]:
    """The encoded map on the asked grid, with its height and width."""
    h, w = _grid(m, result, size)
    if encoding is Encoding.NPY:
        data = npy(resize(m.values, h, w))
    elif encoding is Encoding.PNG:
        data = png(to_uint8(normalise(m.values), h, w))
    else:
        data = jpeg(canvas.overlay(m.values, m.gradient, h, w))
    return data, h, w


def _preview(result: Result, canvas: Canvas, size: Size) -> ImagePreview:
    """The overlays' own grey backdrop, encoded: what the maps are drawn over."""
    if size is Size.ORIGINAL:
        h, w = result.image.height, result.image.width
    else:
        h, w = result.model.grid
    data = png(canvas.backdrop(h, w))
    spend(_base64_length(data))
    return ImagePreview(width=w, height=h, data=base64.b64encode(data).decode("ascii"))


def _explanation(m: Map, result: Result, canvas: Canvas, encoding: Encoding,
                 size: Size) -> Explanation:
    data, h, w = heatmap_bytes(m, result, canvas, encoding, size)
    spend(_base64_length(data))
    return Explanation(
        method=m.method,
        label=result.label(m.index),
        index=m.index,
        heatmap=Heatmap(encoding=encoding.value, media_type=MEDIA_TYPES[encoding],
                        width=w, height=h, data=base64.b64encode(data).decode("ascii")),
        regions=[Region(box=list(r.box), score=r.score) for r in m.regions],
        points=None if m.points is None else _points(m.points),
    )


def _base64_length(data: bytes) -> int:
    return 4 * ((len(data) + 2) // 3)


def _points(xy: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 3), round(float(y), 3)] for x, y in xy]


def _model_ref(model: Served) -> ModelRef:
    return ModelRef(name=model.name, version=model.config.version)


def predictions(result: Result) -> list[Prediction]:
    labels = result.model.config.labels
    return [Prediction(label=label, index=i, score=round(float(s), 6))
            for i, (label, s) in enumerate(zip(labels, result.scores))]


def image_info(image: DecodedImage) -> ImageInfo:
    dicom = None
    if image.format == "dicom":
        m = image.meta
        dicom = DicomInfo(
            study_instance_uid=_str(m.get("StudyInstanceUID")),
            series_instance_uid=_str(m.get("SeriesInstanceUID")),
            sop_instance_uid=_str(m.get("SOPInstanceUID")),
            modality=_str(m.get("Modality")),
            transfer_syntax_uid=_str(m.get("TransferSyntaxUID")),
            photometric_interpretation=_str(m.get("PhotometricInterpretation")),
            frames=int(m.get("frames", 1)),
            frame=int(m.get("frame", 0)),
        )
    return ImageInfo(width=image.width, height=image.height, format=image.format, dicom=dicom)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


__all__ = ["JsonMaps", "heatmap_bytes", "image_info", "json_response", "predict_response",
           "predictions"]
