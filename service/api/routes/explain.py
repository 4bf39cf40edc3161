"""POST /explain and POST /predict."""

from __future__ import annotations

from fastapi import APIRouter, Request

from schemas import ExplainResponse, PredictResponse
from service import imaging, pipeline
from service.api.deps import ApiKey, LimiterDep, MetricsDep, RepositoryDep, SettingsDep
from service.api.docs import ERRORS, upload_operation
from service.api.params import (
    DECODE_PARAMS,
    EXPLAIN_PARAMS,
    DecodeOptions,
    decode_options,
    explain_options,
    read_upload,
)
from service.config import Settings
from service.imaging.base import DecodedImage

router = APIRouter(tags=["inference"], dependencies=[ApiKey])


def _decode(data: bytes, media_type: str | None, options: DecodeOptions,
            settings: Settings) -> DecodedImage:
    return imaging.decode(data, media_type, frame=options.frame, window=options.window,
                          max_pixels=settings.max_pixels)


@router.post("/explain", response_model=ExplainResponse, responses=ERRORS,
             openapi_extra=upload_operation(EXPLAIN_PARAMS),
             summary="Scores for every label and heatmaps explaining the chosen ones")
async def explain(request: Request, settings: SettingsDep, repository: RepositoryDep,
                  limiter: LimiterDep, metrics: MetricsDep) -> ExplainResponse:
    upload = await read_upload(request, settings, EXPLAIN_PARAMS)
    options = explain_options(upload.params)
    decoding = decode_options(upload.params)
    model = repository.get(upload.params.get("model"))

    def work() -> ExplainResponse:
        watch = pipeline.Stopwatch()
        image = _decode(upload.data, upload.media_type, decoding, settings)
        watch.lap("decode")
        return pipeline.explain(model, image, options, watch)

    result = await limiter.run(work)
    for name in options.methods:
        metrics.method_latency.labels(model.name, name).observe(result.timings_ms[name] / 1e3)
    return result


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
        image = _decode(upload.data, upload.media_type, decoding, settings)
        watch.lap("decode")
        return pipeline.predict(model, image, watch)

    return await limiter.run(work)
