"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated, TypedDict

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.admission import Admission, key_error
from service.api.metrics import Metrics
from service.config import Settings
from service.models.repository import Repository
from service.runtime.worker import Limiter, Scheduler


class State(TypedDict):
    """What the lifespan yields; Starlette exposes it as ``request.state``."""

    settings: Settings
    repository: Repository
    limiter: Limiter
    metrics: Metrics
    admission: Admission
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


def get_admission(request: Request) -> Admission:
    return request.state.admission  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]
LimiterDep = Annotated[Limiter, Depends(get_limiter)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]

# The two ways to present a key, as OpenAPI security schemes (components.securitySchemes);
# auto_error=False: a missing key is this service's 401 problem, not FastAPI's 403.
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", scheme_name="apiKey", auto_error=False,
                              description="required when the service has API keys configured")
BEARER = HTTPBearer(scheme_name="bearer", auto_error=False,
                    description="the same API key as `Authorization: Bearer <key>`")


def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> None:
    """When keys are configured, accept ``X-API-Key: k`` or ``Authorization: Bearer k``.

    Routes read their bodies by hand, after their dependencies: a request without a valid
    key is refused before a byte of its body is read.
    """
    given = api_key if api_key is not None else (bearer.credentials if bearer else None)
    error = key_error(given.encode("latin-1") if given is not None else None,
                      settings.api_keys)
    if error is not None:
        raise error


ApiKey = Depends(require_api_key)
