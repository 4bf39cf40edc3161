"""KServe V1 (TensorFlow Serving's REST API with KServe's ``:explain`` verb), over the
pipeline that serves /predict and /explain.

Images travel as TF-Serving and KServe image models take them:
``{"instances": [{"image_bytes": {"b64": "<base64 DICOM, PNG or JPEG>"}}, ...]}`` (or the
bare ``{"b64": ...}``). ``:predict`` answers, per instance, the body /predict answers for
that image; ``:explain`` adds, per instance, the body /explain answers. The other
parameters are /predict's and /explain's, as query parameters.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response

from schemas.protocols import (
    V1ExplainResponse,
    V1ModelReady,
    V1ModelsResponse,
    V1PredictResponse,
    V1Request,
)
from service import outputs, pipeline
from service.api.body import parse_inference_json, read_inflated_body
from service.api.deps import (
    ApiKey,
    LimiterDep,
    MetricsDep,
    RepositoryDep,
    SchedulerDep,
    SettingsDep,
)
from service.api.docs import ERRORS, body_schema
from service.api.metrics import label_model
from service.api.paths import KSERVE_V1
from service.api.request import ExplainParams, PredictParams, parameter_schemas, parse_params
from service.api.routes.explain import compute, decode_upload, input_size
from service.config import Settings
from service.errors import InvalidInferenceRequest, InvalidParameter
from service.models.repository import Served
from service.outputs.base import JSON, Packaging
from service.outputs.json_maps import predict_response
from service.outputs.limit import AnswerLimit
from service.runtime.worker import Limiter, Scheduler

T = TypeVar("T")

router = APIRouter(prefix=KSERVE_V1, tags=["kserve-v1"],
                   dependencies=[ApiKey])

# The model is the path's; the DICOM object belongs to /explain's DICOM answers.
_NOT_HERE = frozenset({"model", "dicom"})


def _request_body(kind: type[PredictParams]) -> dict[str, Any]:
    """``openapi_extra``: the instances body and ``kind``'s parameters as query parameters."""
    return {
        "parameters": [{"name": n, "in": "query", "required": False, "schema": s}
                       for n, s in parameter_schemas(kind).items() if n not in _NOT_HERE],
        "requestBody": {"required": True, "content": {
            JSON: {"schema": body_schema(V1Request, _instances_limit)}}},
    }


def _instances_limit(schemas: dict[str, Any], settings: Settings) -> None:
    schemas["V1Request"]["properties"]["instances"]["maxItems"] = settings.max_instances


@router.get("", response_model=V1ModelsResponse, summary="Served models (KServe V1)")
async def v1_list_models(repository: RepositoryDep) -> V1ModelsResponse:
    return V1ModelsResponse(models=list(repository.served))


@router.get("/{name}", response_model=V1ModelReady, responses={404: ERRORS[404]},
            summary="One model is ready (KServe V1)")
async def v1_model_ready(name: str, request: Request,
                         repository: RepositoryDep) -> V1ModelReady:
    model = repository.get(name)
    label_model(request, model.name)
    return V1ModelReady(name=model.name, ready=True)


@router.post("/{name}:predict", response_model=V1PredictResponse, responses=ERRORS,
             openapi_extra=_request_body(PredictParams),
             summary="Scores for every label of each instance (KServe V1)")
async def v1_predict(name: str, request: Request, settings: SettingsDep,
                     repository: RepositoryDep, limiter: LimiterDep,
                     scheduler: SchedulerDep) -> Response:
    model = repository.get(name)
    label_model(request, model.name)
    images = await _instances(request, settings)
    params: PredictParams = _params(request, PredictParams)
    bodies = await _run(images, model, None, params, settings, limiter, scheduler,
                        lambda result: bytes(predict_response(result).body))
    return _compose({"predictions": bodies})


@router.post("/{name}:explain", response_model=V1ExplainResponse, responses=ERRORS,
             openapi_extra=_request_body(ExplainParams),
             summary="Scores and heatmaps of each instance (KServe V1)")
async def v1_explain(name: str, request: Request, settings: SettingsDep,
                     repository: RepositoryDep, limiter: LimiterDep,
                     scheduler: SchedulerDep, metrics: MetricsDep) -> Response:
    model = repository.get(name)
    label_model(request, model.name)
    images = await _instances(request, settings)
    params: ExplainParams = _params(request, ExplainParams)
    output = outputs.JSON_OUTPUT
    options = output.options(params, model, Packaging.JSON)
    limit = AnswerLimit(settings.max_answer_bytes)  # every instance's maps together

    def render(result: pipeline.Result) -> tuple[bytes, bytes]:
        metrics.observe_methods(result)
        # /predict's body first: the JSON output's render also closes the timings.
        with limit.applied():
            return (bytes(predict_response(result).body),
                    bytes(output.render(result, params, Packaging.JSON).body))

    bodies = await _run(images, model, options, params, settings, limiter, scheduler, render)
    return _compose({"predictions": [p for p, _ in bodies],
                     "explanations": [e for _, e in bodies]})


async def _run(images: list[bytes], model: Served, options: pipeline.ExplainOptions | None,
               params: PredictParams, settings: Settings, limiter: Limiter,
               scheduler: Scheduler, render: Callable[[pipeline.Result], T]) -> list[T]:
    """Each instance through the pipeline and ``render``, all admitted as one request; the
    instances go to the compute stream together, so they can share a batch."""

    def prepare(data: bytes) -> pipeline.Job:
        watch = pipeline.Stopwatch()
        image = decode_upload(data, None, params, settings, model, input_size(model, settings))
        watch.lap("decode")
        return pipeline.prepare(model, image, options, watch)

    async with limiter.admit():
        jobs = [await limiter.run(prepare, data) for data in images]
        # Every instance waits for its answer, also when another one fails: the first
        # instance's error is the request's, and no computation is left behind unawaited.
        done = await asyncio.gather(*(compute(scheduler, model, job) for job in jobs),
                                    return_exceptions=True)
        for item in done:
            if isinstance(item, BaseException):
                raise item
        return [await limiter.run(lambda c=c: render(pipeline.finish(model, c)))
                for c in done]


async def _instances(request: Request, settings: Settings) -> list[bytes]:
    """The images of the instances body.

    Raises:
        InvalidInferenceRequest: not the instances JSON, bad base64, too many instances,
            a compressed body that does not inflate.
        PayloadTooLarge: a body over the upload limit, compressed or inflated.
        UnsupportedMediaType: a Content-Encoding other than gzip or deflate.
    """
    body = await read_inflated_body(request, settings)
    # Refused before parsing: millions of tiny instances would cost far more memory parsed
    # than as bytes. Instances are separated by commas, and base64 holds none.
    if body.count(b",") >= 4 * settings.max_instances + 16:
        raise InvalidInferenceRequest(f"more than {settings.max_instances} instances; the "
                                      "limit is that per request")
    parsed = parse_inference_json(
        V1Request, body, 'the body is not {"instances": [{"image_bytes": {"b64": "..."}}, ...]}')
    if not parsed.instances:
        raise InvalidInferenceRequest("instances is empty: give at least one image")
    if len(parsed.instances) > settings.max_instances:
        raise InvalidInferenceRequest(f"{len(parsed.instances)} instances; the limit is "
                                      f"{settings.max_instances} per request")
    images = []
    for i, instance in enumerate(parsed.instances):
        text = instance.image_bytes.b64 if instance.image_bytes is not None else instance.b64
        if text is None or len(instance.model_fields_set) != 1:
            raise InvalidInferenceRequest(f"instances[{i}] holds one image: "
                                          '{"image_bytes": {"b64": "..."}} or {"b64": "..."}')
        try:
            images.append(base64.b64decode(text, validate=True))
        # binascii.Error for bad base64; a plain ValueError for a non-ASCII string.
        except ValueError as exc:
            raise InvalidInferenceRequest(f"instances[{i}] is not valid base64") from exc
    return images


def _params(request: Request, kind: type[PredictParams]) -> Any:
    pairs = list(request.query_params.multi_items())
    for name, _ in pairs:
        if name in _NOT_HERE:
            raise InvalidParameter(f"parameter {name!r} does not apply here (the model is "
                                   "the path's; DICOM answers are /explain's)")
    return parse_params(kind, pairs)


def _compose(lists: dict[str, list[bytes]]) -> Response:
    """A JSON object of lists of already written JSON bodies: each instance's body is
    byte for byte what /predict or /explain answers, with no second encoding pass."""
    parts = [b'"' + key.encode() + b'":[' + b",".join(items) + b"]"
             for key, items in lists.items()]
    return Response(b"{" + b",".join(parts) + b"}", media_type=JSON)
