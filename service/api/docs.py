"""OpenAPI descriptions of the upload routes, whose bodies are parsed by hand (api/body.py)
and whose parameters come from the request models (api/request.py)."""

from __future__ import annotations

from typing import Any

from schemas import Problem
from service.api.request import PredictParams, parameter_schemas

BINARY = {"schema": {"type": "string", "format": "binary"}}


def upload_operation(kind: type[PredictParams]) -> dict[str, Any]:
    """``openapi_extra`` for a route taking an image as a raw body or multipart upload,
    with ``kind``'s parameters as query parameters or form fields."""
    params = parameter_schemas(kind)
    form_props: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": "DICOM, PNG or JPEG"}}
    form_props.update(params)
    return {
        "parameters": [
            {"name": n, "in": "query", "required": False, "schema": schema}
            for n, schema in params.items()
        ],
        "requestBody": {
            "required": True,
            "description": "the image: a raw body with its media type, or multipart/form-data "
                           "with a 'file' part and the parameters as fields (each parameter "
                           "once: as a query parameter or a form field)",
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                   "properties": form_props}},
                "application/dicom": BINARY,
                "image/png": BINARY,
                "image/jpeg": BINARY,
            },
        },
    }


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description,
            "content": {"application/problem+json": {}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("the image or body cannot be read (invalid_image, invalid_dicom, ...)"),
    401: _problem("API keys are configured and the request has none or a wrong one"),
    408: _problem("the body arrived slower than the minimum rate (body_timeout)"),
    404: _problem("unknown model"),
    413: _problem("the upload, its pixel count or the memory its decoding would take is "
                  "over the limit (payload_too_large, decode_budget_exceeded)"),
    415: _problem("unsupported media type, or DICOM without pixel data"),
    422: _problem("a parameter has a bad value (unknown method or label, ...)"),
    503: _problem("overloaded, draining or timed out (retry after the Retry-After header's "
                  "seconds), or the model failed to load (model_unavailable)"),
}
