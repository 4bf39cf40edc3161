"""OpenAPI descriptions of what the upload routes parse by hand (see api/body.py)."""

from __future__ import annotations

from typing import Any

from schemas import Problem
from service.methods import DEFAULT_METHODS, METHODS, Target
from service.methods.render import Encoding, Size

_PARAMS: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "description": "model name; default: the default model"},
    "frame": {"type": "integer", "minimum": 0, "default": 0,
              "description": "frame of a multi-frame DICOM"},
    "window": {"type": "string", "examples": ["40,400", "none"],
               "description": "DICOM window 'center,width' overriding the file's VOI LUT/window, "
                              "or 'none' for min-max scaling"},
    "methods": {"type": "string", "default": ",".join(DEFAULT_METHODS),
                "description": f"comma list of {', '.join(METHODS)}"},
    "classes": {"type": "string",
                "description": "comma list of labels or indices; default: labels with "
                               "score >= score_threshold, at least the top one"},
    "heatmap": {"type": "string", "enum": [e.value for e in Encoding], "default": "png",
                "description": "png: 8-bit max-normalised map; npy: base64 .npy float32 raw "
                               "map; overlay: colour PNG of the map over the image"},
    "size": {"type": "string", "enum": [s.value for s in Size], "default": "original",
             "description": "grid of the returned map: the uploaded image's, the network "
                            "input's, or the target layer's (CAM-type maps only)"},
    "target": {"type": "string", "enum": [t.value for t in Target], "default": "logit",
               "description": "which score is differentiated or perturbed"},
    "region_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                         "description": "cut on the max-normalised map for region boxes"},
    "score_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                        "description": "score from which a label is explained by default"},
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}


def upload_operation(names: tuple[str, ...]) -> dict[str, Any]:
    """``openapi_extra`` for a route taking an image as a raw body or multipart upload."""
    form_props: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": "DICOM, PNG or JPEG"}}
    form_props.update({n: _PARAMS[n] for n in names})
    return {
        "parameters": [
            {"name": n, "in": "query", "required": False, "schema": _PARAMS[n]} for n in names
        ],
        "requestBody": {
            "required": True,
            "description": "the image: a raw body with its media type, or multipart/form-data "
                           "with a 'file' part and the parameters as fields (fields override "
                           "query parameters)",
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                   "properties": form_props}},
                "application/dicom": _BINARY,
                "image/png": _BINARY,
                "image/jpeg": _BINARY,
            },
        },
    }


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description,
            "content": {"application/problem+json": {}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("the image or body cannot be read (invalid_image, invalid_dicom, ...)"),
    401: _problem("API keys are configured and the request has none or a wrong one"),
    404: _problem("unknown model"),
    413: _problem("the upload or its pixel count is over the limit"),
    415: _problem("unsupported media type, or DICOM without pixel data"),
    422: _problem("a parameter has a bad value (unknown method or label, ...)"),
    503: _problem("overloaded; retry after the Retry-After header's seconds"),
}
