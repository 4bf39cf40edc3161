"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from schemas import Health
from service.api.deps import AdmissionDep, LimiterDep, MetricsDep, RepositoryDep

router = APIRouter(tags=["health"])


# Liveness (Kubernetes restarts the container when it fails): only that the process and its
# event loop answer. Never load or a drain: restarting an overloaded service makes it worse.
@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


# Readiness (Kubernetes sends traffic only while it passes): models loaded, room in the
# queue, and not draining for a shutdown.
@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Readiness: models are loaded, the queue has room, not draining")
async def readyz(repository: RepositoryDep, limiter: LimiterDep,
                 admission: AdmissionDep) -> Health | JSONResponse:
    if admission.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not repository.models:
        return JSONResponse({"status": "no models"}, status_code=503)
    if limiter.is_overloaded() or admission.is_overloaded():
        return JSONResponse({"status": "overloaded"}, status_code=503)
    return Health(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(collected: MetricsDep, limiter: LimiterDep) -> Response:
    collected.pending.set(limiter.pending)
    # The app's HTTP metrics, then the process-wide ones (the compute streams' batch metrics,
    # service.runtime.metrics, and the process collectors).
    return Response(generate_latest(collected.registry) + generate_latest(REGISTRY),
                    media_type=CONTENT_TYPE_LATEST)
