"""The HTTP edge of the error hierarchy: status codes and problem+json responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from schemas import Problem
from service import errors
from service.api.paths import is_protocol, route_label

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"

# Most specific first: the first class an error is an instance of gives its status.
STATUS: tuple[tuple[type[errors.ServiceError], int], ...] = (
    (errors.UnsupportedMediaType, 415),
    (errors.NotAcceptable, 406),
    (errors.BadInput, 400),
    (errors.PayloadTooLarge, 413),
    (errors.InvalidParameter, 422),
    (errors.UnknownModel, 404),
    (errors.Unauthorized, 401),
    (errors.Overloaded, 503),
    (errors.ModelUnavailable, 503),
    (errors.BodyTimeout, 408),
)


def status_of(exc: errors.ServiceError) -> int:
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def problem(status: int, title: str, detail: str, code: str,
            headers: dict[str, str] | None = None, *, path: str = "") -> JSONResponse:
    """A problem+json answer to a request for ``path``. Under an inference protocol's prefix
    the detail is also in an ``error`` member (an extension member, RFC 9457 section 3.2):
    tritonclient and KServe's clients read an error's message from there, for a route's
    own errors and for an unknown path or method alike."""
    body = Problem(title=title, status=status, detail=detail, code=code).model_dump()
    if is_protocol(path):
        body["error"] = detail
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def response_for(exc: errors.ServiceError, path: str = "") -> JSONResponse:
    """The problem+json answer to ``exc`` for a request for ``path``, with the headers its
    status calls for."""
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, errors.Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="medexplain"'}
    return problem(status_of(exc), exc.title, exc.detail, exc.code, headers, path=path)


def _log(request: Request, exc: errors.ServiceError) -> None:
    log.info("%s %s -> %d %s", request.method, route_label(request.scope), status_of(exc),
             exc.code)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    _log(request, exc)
    return response_for(exc, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return problem(422, "Invalid parameter", "; ".join(parts) or "invalid request",
                   "invalid_parameter", path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem(exc.status_code, str(exc.detail), f"{request.method} {request.url.path}: "
                   f"{exc.detail}", code, dict(exc.headers or {}), path=request.url.path)


def internal_error(path: str = "") -> JSONResponse:
    """The answer to a failure no handler knows: nothing about it reaches the client."""
    return problem(500, "Internal error", "the service failed to process the request",
                   "internal_error", path=path)


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    # Anything else is contained by service.api.request_id, which answers internal_error().
