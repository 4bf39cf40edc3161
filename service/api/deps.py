"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

import hmac
from typing import Annotated, TypedDict

from fastapi import Depends, Request

from service.api.metrics import Metrics
from service.config import Settings
from service.errors import Unauthorized
from service.models.repository import Repository
from service.runtime.worker import Limiter, Scheduler


class State(TypedDict):
    """What the lifespan yields; Starlette exposes it as ``request.state``."""

    settings: Settings
    repository: Repository
    limiter: Limiter
    metrics: Metrics
    scheduler: Scheduler


def get_settings(request: Request) -> Settings:
    return request.state.settings  # type: ignore[no-any-return]


def get_repository(request: Request) -> Repository:
    return request.state.repository  # type: ignore[no-any-return]


def get_limiter(request: Request) -> Limiter:
    return request.state.limiter  # type: ignore[no-any-return]


def get_scheduler(request: Request) -> Scheduler:
    return request.state.scheduler  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.state.metrics  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """When keys are configured, accept ``X-API-Key: k`` or ``Authorization: Bearer k``."""
    if not settings.api_keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None:
        raise Unauthorized("this service needs an API key (X-API-Key or Authorization: Bearer)")
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in settings.api_keys):
        raise Unauthorized("the API key is not valid")


ApiKey = Depends(require_api_key)
