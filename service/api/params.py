"""Parsing /explain and /predict parameters from query strings and form fields alike."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from starlette.requests import Request

from service.api.body import parse_multipart, read_body
from service.config import Settings
from service.errors import EmptyBody, InvalidParameter, UnknownMethod
from service.methods import METHODS, Target
from service.methods.render import Encoding, Size
from service.pipeline import ExplainOptions

E = TypeVar("E", bound=StrEnum)

DECODE_PARAMS = ("model", "frame", "window")
EXPLAIN_PARAMS = (*DECODE_PARAMS, "methods", "classes", "heatmap", "size", "target",
                  "region_threshold", "score_threshold")


@dataclass(frozen=True)
class Upload:
    data: bytes
    media_type: str | None
    params: dict[str, str]


@dataclass(frozen=True)
class DecodeOptions:
    frame: int = 0
    window: tuple[float, float] | str | None = None


async def read_upload(request: Request, settings: Settings, allowed: tuple[str, ...]) -> Upload:
    """The image bytes, their declared type, and parameters (form fields override query).

    Raises:
        InvalidParameter: for a parameter name the endpoint does not know.
        EmptyBody, InvalidMultipart, PayloadTooLarge: for unusable bodies.
    """
    params = dict(request.query_params)
    body = await read_body(request, settings.max_upload_bytes)
    content_type = request.headers.get("content-type")
    media_type = content_type.split(";")[0].strip().lower() if content_type else None
    if media_type == "multipart/form-data":
        form = parse_multipart(body, content_type or "")
        params.update(form.fields)
        assert form.file is not None
        body, media_type = form.file.data, form.file.content_type
    if not body:
        raise EmptyBody("the request carries no image (empty body or empty file part)")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InvalidParameter(
            f"unknown parameter(s) {', '.join(unknown)}; this endpoint takes {', '.join(allowed)}"
        )
    return Upload(body, media_type, params)


def _enum(kind: type[E], params: Mapping[str, str], key: str, default: E) -> E:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        return kind(value.strip().lower())
    except ValueError:
        raise InvalidParameter(
            f"{key}={value!r} is not one of {', '.join(m.value for m in kind)}"
        ) from None


def _float(params: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter(f"{key}={value!r} is not a number") from None
    if not (lo <= number <= hi) or math.isnan(number):
        raise InvalidParameter(f"{key}={value!r} must be between {lo} and {hi}")
    return number


def _list(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


def explain_options(params: Mapping[str, str]) -> ExplainOptions:
    """Parse the explanation parameters (unknown values → InvalidParameter/UnknownMethod)."""
    methods = _list(params.get("methods")) or ExplainOptions.methods
    for name in methods:
        if name not in METHODS:
            raise UnknownMethod(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return ExplainOptions(
        methods=tuple(dict.fromkeys(methods)),
        classes=_list(params.get("classes")) or None,
        encoding=_enum(Encoding, params, "heatmap", Encoding.PNG),
        size=_enum(Size, params, "size", Size.ORIGINAL),
        target=_enum(Target, params, "target", Target.LOGIT),
        region_threshold=_float(params, "region_threshold", 0.5, 0.0, 1.0),
        score_threshold=_float(params, "score_threshold", 0.5, 0.0, 1.0),
    )


def decode_options(params: Mapping[str, str]) -> DecodeOptions:
    frame_text = params.get("frame") or "0"
    if not frame_text.isdigit():
        raise InvalidParameter(f"frame={frame_text!r} must be a non-negative integer")
    window_text = (params.get("window") or "").strip().lower()
    window: tuple[float, float] | str | None = None
    if window_text == "none":
        window = "none"
    elif window_text:
        try:
            center, width = (float(v) for v in window_text.split(","))
        except ValueError:
            raise InvalidParameter(
                f"window={window_text!r} must be 'center,width' or 'none'"
            ) from None
        if not (width > 0 and math.isfinite(center) and math.isfinite(width)):
            raise InvalidParameter("window width must be > 0 and both values finite")
        window = (center, width)
    return DecodeOptions(frame=int(frame_text), window=window)


__all__ = ["DECODE_PARAMS", "EXPLAIN_PARAMS", "DecodeOptions", "EmptyBody", "Upload",
           "decode_options", "explain_options", "read_upload"]
