"""POST /explain and POST /predict.

/explain negotiates its response by the Accept header: JSON (the default, also for ``*/*``),
``application/dicom`` (one Secondary Capture of the first explanation), or
``multipart/related; type="application/dicom"`` (one Secondary Capture per explanation,
DICOMweb style). The ``dicom`` parameter picks the DICOM object: ``sc`` (default, Secondary
Captures) or ``sr`` (one Structured Report, TID 1500, of every explanation's scores and
regions, as the whole body or the only part). DICOM output needs a DICOM upload, whose study
the captures or the report join.
"""

from __future__ import annotations

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
    DicomObject,
    Representation,
    accept_header,
    dicom_object,
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
from service.errors import InvalidParameter, NotAcceptable
from service.imaging import secondary_capture, structured_report
from service.imaging.base import DecodedImage
from service.imaging.secondary_capture import Caption, Explained
from service.imaging.structured_report import Finding, Region, Report
from service.methods import METHODS
from service.methods.render import Encoding, Size, display_sigma, smooth
from service.models.repository import Served

router = APIRouter(tags=["inference"], dependencies=[ApiKey])

_BINARY = {"schema": {"type": "string", "format": "binary"}}

# /explain's own parameter, next to the shared ones (service.api.docs, service.api.params).
_DICOM_PARAM: dict[str, Any] = {
    "type": "string", "enum": [o.value for o in DicomObject], "default": "sc",
    "description": "the DICOM object of a DICOM answer (Accept: application/dicom or "
                   "multipart/related; type=\"application/dicom\"): sc: Secondary "
                   "Capture(s) of the maps; sr: one Comprehensive 3D SR (TID 1500) with a "
                   "measurement group per region. Ignored for JSON.",
}
_PARAMS = (*EXPLAIN_PARAMS, "dicom")


def _operation() -> dict[str, Any]:
    operation = upload_operation(EXPLAIN_PARAMS)
    operation["parameters"].append(
        {"name": "dicom", "in": "query", "required": False, "schema": _DICOM_PARAM})
    form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    form["properties"]["dicom"] = _DICOM_PARAM
    return operation


EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "JSON by default (no Accept, */*, application/json). With Accept: "
                       "application/dicom, one DICOM Secondary Capture (RGB: the first "
                       "explanation's map over the image, with a caption and colour bar) in "
                       "the source study: same Study Instance UID and patient/study "
                       "attributes, a new series, referencing the source instance. With "
                       "Accept: multipart/related; type=\"application/dicom\", one such "
                       "capture per explanation, all in one new series. With dicom=sr, the "
                       "DICOM object is instead one Comprehensive 3D SR (TID 1500 Measurement "
                       "Report) in a new series of the source study: one measurement group "
                       "per region of every explanation (a closed POLYLINE rectangle on the "
                       "source image: box [x0,y0,x1,y1] as (column,row) points "
                       "(x0,y0),(x1,y0),(x1,y1),(x0,y1),(x0,y0), pixel edges with the top-left "
                       "pixel centre at (0.5,0.5)), the label's score and the region's peak "
                       "score (UCUM 1), labels and methods coded in 99MEDEXPLAIN, the model as "
                       "algorithm identification; the whole body for application/dicom, the "
                       "only part for multipart/related. DICOM output needs a DICOM upload; "
                       "heatmap and size do not apply to it.",
        "content": {DICOM: _BINARY, MULTIPART_DICOM: _BINARY},
    },
    406: {"model": Problem, "description": "the Accept header allows no representation "
                                           "(not_acceptable); DICOM output for a PNG/JPEG "
                                           "upload or a DICOM without valid UIDs (Study, "
                                           "SOP Instance; dicom=sr: Series too)",
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
             openapi_extra=_operation(),
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
    upload = await read_upload(request, settings, _PARAMS)
    kind = dicom_object(upload.params.get("dicom"))
    if kind is None:
        raise InvalidParameter(f"dicom={upload.params['dicom']!r} is not one of sc, sr")
    report = kind is DicomObject.SR
    options = explain_options(upload.params)
    decoding = decode_options(upload.params)
    model = repository.get(upload.params.get("model"))

    def work() -> tuple[ExplainResponse, pipeline.ExplainOptions, Representation, list[bytes]]:
        watch = pipeline.Stopwatch()
        # Secondary Captures show the image at full resolution: reduce only for JSON and
        # reports (whose regions are in original pixels, as JSON's).
        reduce = report or negotiate(accept, dicom=True) is Representation.JSON
        image = _decode(upload.data, upload.media_type, decoding, settings,
                        _input_size(model) if reduce else None)
        watch.lap("decode")
        possible = (structured_report.is_reportable(image) if report
                    else secondary_capture.is_capturable(image))
        wanted = negotiate(accept, dicom=possible)
        if wanted is None:
            needs, joins = (("Study, Series and SOP Instance UIDs", "Structured Report")
                            if report else
                            ("Study and SOP Instance UIDs", "Secondary Capture"))
            raise NotAcceptable(
                f"DICOM output needs a DICOM upload with valid {needs} (the {joins} joins "
                f"its study); this upload is {image.format}"
            )
        if wanted is Representation.JSON:
            return pipeline.explain(model, image, options, watch), options, wanted, []
        if report:
            # The same computation as JSON's: the report's regions are the JSON regions.
            result = pipeline.explain(model, image, options, watch)
            sr = structured_report.structured_report(
                image, [_finding(e, result) for e in result.explanations],
                _report(model), frame=decoding.frame)
            return result, options, wanted, [sr]
        # Captures draw the maps on the image's own grid; one capture needs one method.
        used = replace(options, encoding=Encoding.NPY, size=Size.ORIGINAL,
                       methods=(options.methods[:1] if wanted is Representation.DICOM
                                else options.methods))
        result, maps = pipeline.explain_with_maps(model, image, used, watch)
        count = 1 if wanted is Representation.DICOM else len(maps)
        parts = secondary_capture.capture_series(
            image, [_explained(e, m, result, model)
                    for e, m in zip(result.explanations[:count], maps[:count])],
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


def _explained(explanation: Explanation, heatmap: np.ndarray, result: ExplainResponse,
               model: Served) -> Explained:
    """A capture's inputs: one explanation and its map on the image's own grid."""
    sigma = display_sigma(heatmap.shape, METHODS[explanation.method].grid)
    if sigma > 0:
        heatmap = smooth(np.abs(heatmap), sigma)
    index = explanation.index
    return Explained(heatmap, Caption(
        method=explanation.method,
        label=explanation.label,
        score=None if index is None else result.predictions[index].score,
        model=model.name,
        model_version=model.config.version,
        software_version=__version__,
        not_for_diagnosis=_not_for_diagnosis(model),
    ))


def _not_for_diagnosis(model: Served) -> bool:
    """Whether the model's description marks it as a demo, not for diagnosis."""
    description = model.config.description.lower()
    return "synthetic" in description or "not for diagnosis" in description


def _finding(explanation: Explanation, result: ExplainResponse) -> Finding:
    """A report's finding from one explanation of the response."""
    index = explanation.index
    return Finding(
        method=explanation.method,
        label=explanation.label,
        score=None if index is None else result.predictions[index].score,
        regions=[Region((r.box[0], r.box[1], r.box[2], r.box[3]), r.score)
                 for r in explanation.regions],
    )


def _report(model: Served) -> Report:
    return Report(model=model.name, model_version=model.config.version,
                  software_version=__version__, not_for_diagnosis=_not_for_diagnosis(model))


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
