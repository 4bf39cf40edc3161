"""POST /explain and POST /predict.

The route reads the parameters (service.api.request), negotiates the answer's packaging
once from the Accept header, decodes and preprocesses in the request pool, computes on the
model's compute stream (batched with other requests; service.pipeline: arrays only) and
hands the result, back in the pool, to the chosen output (service.outputs), which writes
the body. JSON is the
default (also for ``*/*``); ``application/dicom`` and ``multipart/related;
type="application/dicom"`` answer with the DICOM object the ``dicom`` parameter names.
POST /explain/dicom is the same computation answering DICOM only (its own OpenAPI
operation, so that generated clients take its answer as bytes).
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request, Response

from schemas import ExplainResponse, PredictResponse, Problem
from service import imaging, outputs, pipeline
from service.api.deps import (
    ApiKey,
    LimiterDep,
    MetricsDep,
    RepositoryDep,
    SchedulerDep,
    SettingsDep,
)
from service.api.docs import BINARY, ERRORS, upload_operation
from service.api.metrics import Metrics, label_model
from service.api.negotiation import Offer, accept_header, negotiate
from service.api.request import ExplainParams, PredictParams, read_upload
from service.config import Settings
from service.errors import NotAcceptable, UnsupportedMediaType
from service.imaging.base import DecodedImage
from service.models.repository import Repository, Served
from service.models.spec import check_accepted
from service.outputs.base import DICOM, MULTIPART_DICOM, Packaging
from service.outputs.json_maps import predict_response
from service.outputs.limit import AnswerLimit
from service.outputs.transfer_syntax import TRANSFER_SYNTAXES
from service.runtime.worker import Limiter, Scheduler

router = APIRouter(tags=["inference"], dependencies=[ApiKey])

# For the 406: what a transfer-syntax parameter may name.
SYNTAXES = f" (DICOM in transfer-syntax {', '.join(TRANSFER_SYNTAXES)} or *)"

DICOM_DESCRIPTION = (
    "With Accept: application/dicom (the default here), one DICOM Secondary Capture (RGB: "
    "the first explanation's map over the image, with a caption and colour bar) in the "
    "source study: same Study Instance UID and patient/study attributes, a new series, "
    "referencing the source instance. With Accept: multipart/related; "
    "type=\"application/dicom\", one such capture per explanation, in one new series per "
    "method (Series Number 9911 + the method's place in the method list). With dicom=sr, "
    "the DICOM object is instead one Comprehensive 3D SR (TID 1500 Measurement Report) in a "
    "new series of the source study (Series Number 9930; 9931 + the method's place for a "
    "one-method report): one measurement group per "
    "region of every explanation (a closed POLYLINE rectangle on the source image: box "
    "[x0,y0,x1,y1] as (column,row) points (x0,y0),(x1,y0),(x1,y1),(x0,y1),(x0,y0), pixel "
    "edges with the top-left pixel centre at (0.5,0.5)), the label's score and the region's "
    "peak score (UCUM 1), labels coded as model.toml [codes] says (GET /models/{name}: "
    "codes) or else, like methods, in 99MEDEXPLAIN, the model as algorithm "
    "identification; the whole body for application/dicom, the only part for "
    "multipart/related. With dicom=gsps, one Grayscale Softcopy Presentation State (Series "
    "Number 9950, 9951 + the method's place) that shows the source image itself with a "
    "graphic layer per explanation: its regions' outlines as closed POLYLINEs in PIXEL "
    "units, CNN Fixations' points as POINTs (the JSON points + 0.5) and a legend line, the "
    "VOI the network saw; grey sources only. With dicom=seg, one binary Segmentation "
    "(Series Number 9970, 9971 + the method's place), a segment per explanation holding "
    "its regions on the source's pixels; single-frame grey sources of a class without a "
    "required Frame of Reference (CR, DX). A comma list (dicom=sc,sr) answers "
    "multipart/related only: every object named, in that order, from one computation of "
    "the explanations; a 406 names those that cannot be made of the upload. DICOM output "
    "needs a DICOM upload; heatmap and size do not apply to it. Objects are Explicit VR "
    "Little Endian unless the Accept header's transfer-syntax parameter (DICOMweb's) names "
    "another for the captures' pixels: "
    + ", ".join(f"{t.uid} ({t.uid.name}{', lossy' if t.lossy_method else ''})"
                for t in TRANSFER_SYNTAXES.values() if t.compressed)
    + "; * is the default; a compressed answer (or part) names its syntax in its "
    "Content-Type; the SR and the presentation state, without pixels, and the "
    "segmentation's 1-bit frames are always Explicit VR Little Endian.")

NOT_ACCEPTABLE: dict[str, Any] = {
    "model": Problem, "description": "the Accept header allows no representation "
                                     "(not_acceptable), a transfer-syntax it does not "
                                     "write among them; DICOM output for a PNG/JPEG upload "
                                     "or a DICOM without valid UIDs (Study, SOP Instance; "
                                     "dicom=sr: Series too); several DICOM objects "
                                     "(dicom=sc,sr) without multipart/related",
    "content": {"application/problem+json": {}}}

EXPLAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"description": "JSON (no Accept, */*, application/json). The same request "
                         "answers DICOM with Accept: application/dicom or multipart/related; "
                         "type=\"application/dicom\": see POST /explain/dicom, which "
                         "documents those answers."},
    406: NOT_ACCEPTABLE,
}

EXPLAIN_DICOM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"description": DICOM_DESCRIPTION, "content": {DICOM: BINARY, MULTIPART_DICOM: BINARY}},
    406: NOT_ACCEPTABLE,
}


def decode_upload(data: bytes, media_type: str | None, params: PredictParams,
                  settings: Settings, model: Served,
                  min_size: tuple[int, int] | None) -> DecodedImage:
    """The upload decoded for ``model``; a DICOM image it is not for is refused before its
    size is checked or its pixels decoded.

    Raises:
        DicomNotAccepted: the model's ``[accepts]`` refuse the DICOM header.
        ServiceError: the decoder's errors (:func:`service.imaging.decode`).
    """
    return imaging.decode(data, media_type, frame=params.frame, window=params.window,
                          max_pixels=settings.max_pixels, max_frames=settings.max_frames,
                          max_decode_bytes=settings.max_decode_bytes, min_size=min_size,
                          accept=functools.partial(check_accepted, model))


def input_size(model: Served, settings: Settings) -> tuple[int, int] | None:
    """(height, width) the pixels are needed at: the largest input of the model's networks,
    when reduced-resolution JPEG 2000 decoding is enabled; else None (full resolution).

    Big JPEG 2000 radiographs are then decoded at a reduced resolution no smaller than
    that; results stay in original pixels (DecodedImage.width/height).
    """
    if not settings.j2k_reduced_resolution:
        return None
    specs = [member.config.input for member in model.members]
    return max(s.height for s in specs), max(s.width for s in specs)


async def compute(scheduler: Scheduler, model: Served,
                  job: pipeline.Job) -> pipeline.Computed:
    """The job computed on its model's stream (the first network's device)."""
    computed: pipeline.Computed = await scheduler.run(model.name,
                                                      model.members[0].engine.device, job)
    return computed


@router.post("/explain", response_model=ExplainResponse, responses=EXPLAIN_RESPONSES,
             openapi_extra=upload_operation(ExplainParams),
             summary="Scores for every label and heatmaps explaining the chosen ones")
async def explain(request: Request, settings: SettingsDep, repository: RepositoryDep,
                  limiter: LimiterDep, scheduler: SchedulerDep,
                  metrics: MetricsDep) -> Response:
    offers = negotiate(accept_header(request))
    if not offers:
        raise NotAcceptable(f"the Accept header allows none of application/json, {DICOM}, "
                            f"{MULTIPART_DICOM}{SYNTAXES}")
    return await _explain(request, offers, settings, repository, limiter, scheduler, metrics)


@router.post("/explain/dicom", response_class=Response, responses=EXPLAIN_DICOM_RESPONSES,
             openapi_extra=upload_operation(ExplainParams, (DICOM,)),
             summary="/explain answering DICOM: a Secondary Capture or a Structured Report "
                     "in the source study")
async def explain_dicom(request: Request, settings: SettingsDep, repository: RepositoryDep,
                        limiter: LimiterDep, scheduler: SchedulerDep,
                        metrics: MetricsDep) -> Response:
    # Its own operation, so that generated clients take the answer as bytes, not JSON.
    accept = accept_header(request)
    offers = [o for o in negotiate(accept if accept and accept.strip() else DICOM)
              if o.packaging is not Packaging.JSON]
    if not offers:
        raise NotAcceptable(f"the Accept header allows none of {DICOM}, {MULTIPART_DICOM}"
                            f"{SYNTAXES}")
    return await _explain(request, offers, settings, repository, limiter, scheduler,
                          metrics, dicom_only=True)


async def _explain(request: Request, offers: list[Offer], settings: Settings,
                   repository: Repository, limiter: Limiter, scheduler: Scheduler,
                   metrics: Metrics, *, dicom_only: bool = False) -> Response:
    upload = await read_upload(request, settings, ExplainParams)
    params: ExplainParams = upload.params
    model = repository.get(params.model)
    label_model(request, model.name)
    # Best first; an output that cannot answer for this upload (DICOM for a PNG) gives way
    # to the next one the client accepts.
    candidates = [(o, offer) for offer in offers
                  if (o := outputs.for_packaging(offer.packaging, params.dicom)) is not None]
    if not candidates:
        raise NotAcceptable(f"dicom={','.join(params.dicom)} answers several DICOM objects "
                            f"and {DICOM} holds one: accept {MULTIPART_DICOM}")
    first, offer = candidates[0]
    options = first.options(params, model, offer.packaging)

    def prepare() -> tuple[outputs.Output, Offer, pipeline.Job]:
        watch = pipeline.Stopwatch()
        image = decode_upload(upload.data, upload.media_type, params, settings, model,
                              None if first.full_resolution else input_size(model, settings))
        watch.lap("decode")
        chosen = next(((o, p) for o, p in candidates if o.accepts(image)), None)
        if chosen is None:
            if dicom_only and image.format != "dicom":
                # The route takes DICOM only: the upload is what is wrong, not the Accept.
                raise UnsupportedMediaType(f"POST /explain/dicom takes DICOM uploads only; "
                                           f"this upload is {image.format} (POST /explain "
                                           "answers it in JSON)")
            raise NotAcceptable(f"DICOM output needs {first.lacking(image)}; this upload "
                                f"is {image.format}")
        output, used = chosen
        wanted = options if output is first else output.options(params, model, used.packaging)
        return output, used, pipeline.prepare(model, image, wanted, watch)

    async with limiter.admit():
        output, used, job = await limiter.run(prepare)
        computed = await compute(scheduler, model, job)

        def render() -> tuple[Response, pipeline.Result]:
            result = pipeline.finish(model, computed)
            with AnswerLimit(settings.max_answer_bytes).applied():
                answer = output.render(result, params, used.packaging, used.transfer_syntax)
            return answer, result

        answer, result = await limiter.run(render)
    metrics.observe_methods(result)
    return answer


@router.post("/predict", response_model=PredictResponse, responses=ERRORS,
             openapi_extra=upload_operation(PredictParams),
             summary="Scores for every label, no explanation")
async def predict(request: Request, settings: SettingsDep, repository: RepositoryDep,
                  limiter: LimiterDep, scheduler: SchedulerDep) -> Response:
    upload = await read_upload(request, settings, PredictParams)
    params: PredictParams = upload.params
    model = repository.get(params.model)
    label_model(request, model.name)

    def prepare() -> pipeline.Job:
        watch = pipeline.Stopwatch()
        image = decode_upload(upload.data, upload.media_type, params, settings, model,
                              input_size(model, settings))
        watch.lap("decode")
        return pipeline.prepare(model, image, None, watch)

    async with limiter.admit():
        job = await limiter.run(prepare)
        computed = await compute(scheduler, model, job)
        return await limiter.run(lambda: predict_response(pipeline.finish(model, computed)))
