"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from schemas import Health
from service.api.deps import LimiterDep, MetricsDep, RepositoryDep

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Models are loaded and the queue has room")
async def readyz(repository: RepositoryDep, limiter: LimiterDep) -> Health | JSONResponse:
    if not repository.models:
        return JSONResponse({"status": "no models"}, status_code=503)
    if limiter.is_overloaded():
        return JSONResponse({"status": "overloaded"}, status_code=503)
    return Health(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(collected: MetricsDep, limiter: LimiterDep) -> Response:
    collected.pending.set(limiter.pending)
    # The app's HTTP metrics, then the process-wide ones (the compute streams' batch metrics,
    # service.runtime.metrics, and the process collectors).
    return Response(generate_latest(collected.registry) + generate_latest(REGISTRY),
                    media_type=CONTENT_TYPE_LATEST)
