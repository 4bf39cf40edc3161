"""The API's documentation: OpenAPI descriptions of the upload routes (whose bodies are
parsed by hand, api/body.py, and whose parameters come from the request models,
api/request.py), the document's post-processing for client generators, and the
interactive pages (/docs, /redoc) served with their assets from this process."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from schemas import Problem
from service.api.request import PredictParams, parameter_schemas
from service.config import Settings

BINARY = {"schema": {"type": "string", "format": "binary"}}


IMAGE_TYPES = ("application/dicom", "image/png", "image/jpeg")


def upload_operation(kind: type[PredictParams],
                     media_types: tuple[str, ...] = IMAGE_TYPES) -> dict[str, Any]:
    """``openapi_extra`` for a route taking an image (one of ``media_types``) as a raw body
    or multipart upload, with ``kind``'s parameters as query parameters or form fields."""
    params = parameter_schemas(kind)
    form_props: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": " or ".join(media_types)}}
    # No defaults on the form fields: generators fill in a declared default and send it,
    # and with the query parameter's default also sent, the parameter would come twice.
    form_props.update({name: {k: v for k, v in schema.items() if k != "default"}
                       for name, schema in params.items()})
    return {
        "parameters": [
            {"name": n, "in": "query", "required": False, "schema": schema}
            for n, schema in params.items()
        ],
        "requestBody": {
            "required": True,
            "description": "the image: a raw body with its media type, or multipart/form-data "
                           "with a 'file' part and the parameters as fields. The server "
                           "refuses a field it does not know (422 invalid_parameter) and a "
                           "parameter given twice, as a query parameter and a form field or "
                           "repeated (422 repeated_parameter); bytes that are not the image "
                           "they claim to be get 400 (invalid_image, invalid_dicom) or 415 "
                           "(unsupported_media_type).",
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"],
                               "properties": form_props, "additionalProperties": False},
                    "encoding": {"file": {"contentType": ", ".join(media_types)}}},
                **{media: BINARY for media in media_types},
            },
        },
    }


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description,
            "content": {"application/problem+json": {}}}


# Each status with the problem codes it carries. The 4xx that depend on run-time state,
# which no schema can state, are here: the served models (404 unknown_model), the model's
# labels and methods (422 unknown_label, unknown_method), what the image bytes hold (400,
# 413, 415; 422 frame_out_of_range, too_many_frames, dicom_not_accepted).
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("the image or body cannot be read (invalid_image, invalid_dicom, "
                  "invalid_multipart, empty_body, invalid_content_encoding: a gzip or "
                  "deflate body that does not inflate, invalid_inference_request); an Open "
                  "Inference Protocol tensor that does not fit the model (tensor_mismatch) "
                  "or an output the request does not compute (output_not_computed)"),
    401: _problem("API keys are configured and the request has none or a wrong one"),
    408: _problem("the body arrived slower than the minimum rate (body_timeout)"),
    404: _problem("no served model has that name (unknown_model), or that version"),
    413: _problem("the upload, its pixel count or the memory its decoding would take is "
                  "over the limit (payload_too_large, decode_budget_exceeded)"),
    415: _problem("the bytes are not PNG, JPEG or DICOM, the media type is not one of "
                  "them, or the Content-Encoding is not gzip or deflate "
                  "(unsupported_media_type), DICOM without pixel data "
                  "(dicom_without_pixels), or a transfer syntax no decoder reads "
                  "(unsupported_transfer_syntax)"),
    422: _problem("a parameter is refused: a value outside the document's schema or an "
                  "unknown or repeated parameter (invalid_parameter, repeated_parameter, "
                  "unknown_method), a class that is not the model's (unknown_label), a "
                  "method the model cannot serve (unknown_method), a frame the image does "
                  "not have (frame_out_of_range), parameters that do not go together "
                  "(incompatible_parameters), a DICOM with more frames than the limit "
                  "(too_many_frames) or one the model is not meant for "
                  "(dicom_not_accepted), an answer larger than MEDEXPLAIN_MAX_ANSWER_BYTES "
                  "(answer_too_large)"),
    503: _problem("overloaded, draining or timed out (retry after the Retry-After header's "
                  "seconds), or the model failed to load (model_unavailable)"),
}


# ---- The interactive documentation, served from this process (no CDN) ----
# Swagger UI and ReDoc come from fastapi-offline, a maintained package that ships both
# bundles; the pages reference only this service's own paths, so /docs works offline and
# behind a strict Content-Security-Policy.
DOCS_ASSETS: Final[Path] = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL: Final[str] = "/docs/assets"


# The pages' own inline scripts (Swagger UI's set-up) are allowed by their hashes; styles
# inline, as both bundles inject theirs; images from this origin only, which keeps even the
# logo ReDoc's bundle links from its vendor's CDN from being fetched.
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_DOCS_POLICY = ("default-src 'none'; script-src 'self' {scripts}; style-src 'self' "
                "'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
                "connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
                "form-action 'none'; frame-ancestors 'none'")


def _under_policy(page: HTMLResponse) -> HTMLResponse:
    """``page`` with a Content-Security-Policy that names its inline scripts' hashes."""
    scripts = " ".join(
        "'sha256-{}'".format(base64.b64encode(hashlib.sha256(m.group(1).encode()).digest())
                             .decode())
        for m in _INLINE_SCRIPT.finditer(bytes(page.body).decode()))
    page.headers["Content-Security-Policy"] = _DOCS_POLICY.format(scripts=scripts)
    page.headers["Referrer-Policy"] = "no-referrer"
    return page


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI), /redoc (ReDoc) and their assets under /docs/assets.

    ``app`` must be created with ``docs_url=None, redoc_url=None`` (FastAPI's own pages load
    their scripts from a CDN).
    """
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _under_policy(get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            # Swagger UI would otherwise send the document to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        ))

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _under_policy(get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False,
        ))


# ---- The OpenAPI document, fit for client generators ----


def operation_id(route: APIRoute) -> str:
    """The operationId: the route function's name (``explain``, ``v2_model_infer``), which
    generators turn into method names, instead of FastAPI's ``explain_explain_post``."""
    return route.name


_PROBLEM_REF: Final[dict[str, str]] = {"$ref": "#/components/schemas/Problem"}
_COMPONENTS: Final[str] = "#/components/schemas/{model}"
# Bodies that routes parse by hand (so FastAPI does not see them), added to the components,
# each with the function that states in the components what the route checks by hand.
Refine = Callable[[dict[str, Any], Settings], None]
_BODY_MODELS: dict[type[BaseModel], Refine | None] = {}


def body_schema(model: type[BaseModel], refine: Refine | None = None) -> dict[str, str]:
    """A reference to ``model``'s schema for a hand-parsed request body's ``openapi_extra``;
    :func:`openapi_document` adds the schema to the components, then calls ``refine`` with
    the components and the settings: the constraints the route checks beyond the model's
    (limits from the settings, rules the route applies by hand)."""
    _BODY_MODELS.setdefault(model, refine)
    return {"$ref": _COMPONENTS.format(model=model.__name__)}


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """FastAPI's document with errors declared as they are sent: problem+json, and the
    hand-parsed bodies as their routes check them (:func:`body_schema`).

    FastAPI lists a ``model`` under ``application/json`` whatever the response's media
    type, and adds a 422 ``HTTPValidationError`` that this service never sends (its
    validation errors are problems too); generated clients would parse both wrongly.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version,
                           description=app.description, routes=app.routes)
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.startswith(("4", "5")) and (
                        "application/problem+json" in content
                        or "HTTPValidationError" in json.dumps(content)):
                    response["content"] = {"application/problem+json": {"schema": _PROBLEM_REF}}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in _BODY_MODELS:
        schema = model.model_json_schema(ref_template=_COMPONENTS)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for refine in _BODY_MODELS.values():
        if refine is not None:
            refine(schemas, settings)
    text = json.dumps(document["paths"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f"/{unused}\"" not in text:
            del schemas[unused]
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    app.openapi_schema = document
    return document
