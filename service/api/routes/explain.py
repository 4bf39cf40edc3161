"""POST /explain and POST /predict.

/explain negotiates its response by the Accept header: JSON (the default, also for ``*/*``),
``application/dicom`` (one Secondary Capture of the first explanation), or
``multipart/related; type="application/dicom"`` (one Secondary Capture per explanation,
DICOMweb style). DICOM output needs a DICOM upload, whose study the captures join.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from schemas import ExplainResponse, Explanation, PredictResponse, Problem
from service import __version__, imaging, pipeline
from service.api.deps import ApiKey, LimiterDep, MetricsDep, RepositoryDep, SettingsDep
from service.api.docs import ERRORS, upload_operation
from service.api.negotiation import (
    DICOM,
    MULTIPART_DICOM,
    Representation,
    accept_header,
    multipart_related,
    negotiate,
)
from service.api.params import (
    DECODE_PARAMS,
    EXPLAIN_PARAMS,
    DecodeOptions,
    decode_options,
    explain_options,
    read_upload,
)
from service.config import Settings
from service.errors import NotAcceptable
from service.imaging import secondary_capture
from service.imaging.base import DecodedImage
from service.imaging.secondary_capture import Caption, Explained
from service.methods.render import Encoding, Size
from service.models.repository import Served

router = APIRouter(tags=["inference"], dependencies=[ApiKey])

_BINARY = {"schema": {"type": "string", "format": "binary"}}

EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "JSON by default (no Accept, */*, application/json). With Accept: "
                       "application/dicom, one DICOM Secondary Capture (RGB: the first "
                       "explanation's map over the image, with a caption and colour bar) in "
                       "the source study: same Study Instance UID and patient/study "
                       "attributes, a new series, referencing the source instance. With "
                       "Accept: multipart/related; type=\"application/dicom\", one such "
                       "capture per explanation, all in one new series. DICOM output needs a "
                       "DICOM upload; heatmap and size do not apply to it.",
        "content": {DICOM: _BINARY, MULTIPART_DICOM: _BINARY},
    },
    406: {"model": Problem, "description": "the Accept header allows no representation "
                                           "(not_acceptable); DICOM output for a PNG/JPEG "
                                           "upload or a DICOM without valid UIDs",
          "content": {"application/problem+json": {}}},
}


def _decode(data: bytes, media_type: str | None, options: DecodeOptions,
            settings: Settings, min_size: tuple[int, int] | None = None) -> DecodedImage:
    return imaging.decode(data, media_type, frame=options.frame, window=options.window,
                          max_pixels=settings.max_pixels, max_frames=settings.max_frames,
                          min_size=min_size)


def _input_size(model: Served) -> tuple[int, int]:
    """(height, width) the pixels are needed at: the largest input of the model's networks.

    Big JPEG 2000 radiographs are then decoded at a reduced resolution no smaller than
    that; results stay in original pixels (DecodedImage.width/height).
    """
    specs = [member.config.input for member in model.members]
    return max(s.height for s in specs), max(s.width for s in specs)


@router.post("/explain", response_model=ExplainResponse, responses=EXPLAIN_RESPONSES,
             openapi_extra=upload_operation(EXPLAIN_PARAMS),
             summary="Scores for every label and heatmaps explaining the chosen ones")
async def explain(request: Request, response: Response, settings: SettingsDep,
                  repository: RepositoryDep, limiter: LimiterDep,
                  metrics: MetricsDep) -> ExplainResponse | Response:
    accept = accept_header(request)
    if negotiate(accept, dicom=True) is None:
        raise NotAcceptable(
            "the Accept header allows none of application/json, application/dicom, "
            f"{MULTIPART_DICOM}"
        )
    upload = await read_upload(request, settings, EXPLAIN_PARAMS)
    options = explain_options(upload.params)
    decoding = decode_options(upload.params)
    model = repository.get(upload.params.get("model"))

    def work() -> tuple[ExplainResponse, pipeline.ExplainOptions, Representation, list[bytes]]:
        watch = pipeline.Stopwatch()
        # Secondary Captures show the image at full resolution: reduce only for JSON.
        json_only = negotiate(accept, dicom=True) is Representation.JSON
        image = _decode(upload.data, upload.media_type, decoding, settings,
                        _input_size(model) if json_only else None)
        watch.lap("decode")
        wanted = negotiate(accept, dicom=secondary_capture.is_capturable(image))
        if wanted is None:
            raise NotAcceptable(
                "DICOM output needs a DICOM upload with valid Study and SOP Instance UIDs "
                f"(the Secondary Capture joins its study); this upload is {image.format}"
            )
        if wanted is Representation.JSON:
            return pipeline.explain(model, image, options, watch), options, wanted, []
        # Captures need the raw maps on the image's own grid; one capture needs one method.
        used = replace(options, encoding=Encoding.NPY, size=Size.ORIGINAL,
                       methods=(options.methods[:1] if wanted is Representation.DICOM
                                else options.methods))
        result = pipeline.explain(model, image, used, watch)
        chosen = result.explanations[:1] if wanted is Representation.DICOM else \
            result.explanations
        parts = secondary_capture.capture_series(
            image, [_explained(e, result, model) for e in chosen],
            software_version=__version__, frame=decoding.frame)
        return result, used, wanted, parts

    result, used, wanted, parts = await limiter.run(work)
    for name in used.methods:
        metrics.method_latency.labels(model.name, name).observe(result.timings_ms[name] / 1e3)
    headers = {"Vary": "Accept"}
    if wanted is Representation.DICOM:
        return Response(parts[0], media_type=DICOM, headers=headers)
    if wanted is Representation.MULTIPART:
        body, boundary = multipart_related(parts)
        return Response(body, media_type=f"{MULTIPART_DICOM}; boundary={boundary}",
                        headers=headers)
    response.headers.update(headers)
    return result


def _explained(explanation: Explanation, result: ExplainResponse,
               model: Served) -> Explained:
    """A capture's inputs from one explanation of a heatmap=npy, size=original response."""
    heatmap = np.load(io.BytesIO(base64.b64decode(explanation.heatmap.data)),
                      allow_pickle=False)
    index = explanation.index
    description = model.config.description.lower()
    return Explained(heatmap, Caption(
        method=explanation.method,
        label=explanation.label,
        score=None if index is None else result.predictions[index].score,
        model=model.name,
        model_version=model.config.version,
        software_version=__version__,
        not_for_diagnosis="synthetic" in description or "not for diagnosis" in description,
    ))


@router.post("/predict", response_model=PredictResponse, responses=ERRORS,
             openapi_extra=upload_operation(DECODE_PARAMS),
             summary="Scores for every label, no explanation")
async def predict(request: Request, settings: SettingsDep, repository: RepositoryDep,
                  limiter: LimiterDep) -> PredictResponse:
    upload = await read_upload(request, settings, DECODE_PARAMS)
    decoding = decode_options(upload.params)
    model = repository.get(upload.params.get("model"))

    def work() -> PredictResponse:
        watch = pipeline.Stopwatch()
        image = _decode(upload.data, upload.media_type, decoding, settings,
                        _input_size(model))
        watch.lap("decode")
        return pipeline.predict(model, image, watch)

    return await limiter.run(work)
