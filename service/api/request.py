"""The parameters of /predict and /explain: one pydantic model each, written once.

Query parameters and multipart form fields are the same parameters; both are read from
strings by these models, which also give the OpenAPI document its parameter and form
schemas (:func:`parameter_schemas`). A parameter given twice (in the query and as a form
field, or twice in one of them) is refused rather than one silently preferred.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import Request

from service.api.body import read_body, read_form
from service.config import Settings
from service.errors import EmptyBody, InvalidParameter, UnknownMethod
from service.methods import METHODS, Target
from service.outputs import DICOM_OUTPUTS, DicomObject
from service.outputs.render import Encoding, Size
from service.pipeline import ExplainOptions


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _window(value: object) -> object:
    """'center,width' → (center, width); 'none' stays; anything else is refused."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text == "none":
        return "none"
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise PydanticCustomError("window", "must be 'center,width' or 'none'") from None
    if not (width > 0 and math.isfinite(center) and math.isfinite(width)):
        raise PydanticCustomError("window", "window width must be > 0 and both values finite")
    return (center, width)


CommaList = Annotated[tuple[str, ...], BeforeValidator(_comma_list)]
Window = Annotated[
    tuple[float, float] | Literal["none"] | None,
    BeforeValidator(_window),
    WithJsonSchema({"type": "string", "examples": ["40,400", "none"]}),
]


class PredictParams(BaseModel):
    """What /predict takes besides the image; /explain takes these too."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              str_max_length=10_000)

    model: Annotated[str | None, WithJsonSchema({"type": "string"})] = Field(
        None, description="model name; default: the default model")
    frame: int = Field(0, ge=0, le=2**31 - 1, description="0-based frame of a multi-frame DICOM")
    window: Window = Field(
        None, description="DICOM window 'center,width' overriding the file's VOI LUT/window, "
                          "or 'none' for min-max scaling")

    @field_validator("*", mode="before")
    @classmethod
    def _case_insensitive_enums(cls, value: object, info: Any) -> object:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and isinstance(annotation, type) and issubclass(annotation,
                                                                                   Enum):
            return value.strip().lower()
        return value


class ExplainParams(PredictParams):
    """What /explain takes besides the image."""

    methods: Annotated[CommaList, WithJsonSchema({"type": "string"})] = Field(
        ("gradcam", "crm"), description=f"comma list of {', '.join(METHODS)}")
    classes: Annotated[CommaList | None, WithJsonSchema({"type": "string"})] = Field(
        None, description="comma list of labels or indices; default: labels with "
                          "score >= score_threshold, at least the top one")
    heatmap: Encoding = Field(
        Encoding.PNG, description="png: 8-bit max-normalised map (PNG); npy: base64 .npy "
                                  "float32 raw map; overlay: the map in colour over the "
                                  "image (JPEG)")
    size: Size = Field(
        Size.MODEL, description="grid of the returned map: model: the network input's "
                                "(small; stretch it onto the image); original: the uploaded "
                                "image's; feature: the target layer's (CAM-type maps only)")
    target: Target = Field(Target.LOGIT,
                           description="which score is differentiated or perturbed")
    region_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                    description="cut on the max-normalised map for region boxes")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                   description="score from which a label is explained by default")
    dicom: DicomObject = Field(
        next(iter(DicomObject)),
        description="the DICOM object of a DICOM answer (Accept: application/dicom or "
                    "multipart/related; type=\"application/dicom\"): "
                    + "; ".join(f"{name}: {o.summary}" for name, o in DICOM_OUTPUTS.items())
                    + ". Ignored for JSON.")
    preview: bool = Field(
        False, description="JSON only: also return the image as the network saw it "
                           "(windowed, MONOCHROME1 inverted) as an 8-bit grey PNG on the maps' "
                           "grid (the model's for size=feature), for clients that cannot "
                           "decode the upload, as a browser cannot decode DICOM")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            return cls.model_fields["methods"].default  # type: ignore[no-any-return]
        value = tuple(name.lower() for name in value)  # as enum values: case-insensitive
        for name in value:
            if name not in METHODS:
                raise PydanticCustomError(
                    "unknown_method", "unknown method {name}; available: {available}",
                    {"name": repr(name[:100]), "available": ", ".join(METHODS)})
        return tuple(dict.fromkeys(value))

    @field_validator("classes")
    @classmethod
    def _no_empty_classes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return value or None

    def options(self) -> ExplainOptions:
        """What the pipeline computes."""
        return ExplainOptions(methods=self.methods, classes=self.classes, target=self.target,
                              region_threshold=self.region_threshold,
                              score_threshold=self.score_threshold)


def parse_params(kind: type[PredictParams], pairs: Iterable[tuple[str, str]]) -> Any:
    """A parameters model from (name, value) strings; empty values mean the default.

    Raises:
        InvalidParameter: an unknown or repeated name, or a bad value.
        UnknownMethod: a method name that is not one.
    """
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in kind.model_fields:
            known = ", ".join(kind.model_fields)
            raise InvalidParameter(
                f"unknown parameter {name[:100]!r}; this endpoint takes {known}")
        if name in values:
            raise InvalidParameter(
                f"parameter {name!r} is given more than once (as a query parameter and a "
                "form field, or repeated); give it once")
        values[name] = value
    try:
        return kind.model_validate({k: v for k, v in values.items() if v.strip()})
    except ValidationError as exc:
        raise _problem(kind, exc) from None


def _problem(kind: type[PredictParams], exc: ValidationError) -> InvalidParameter:
    """One clear message for the first invalid parameter (pydantic lists all of them)."""
    error = exc.errors(include_url=False)[0]
    name = str(error["loc"][0]) if error["loc"] else "?"
    value = error.get("input")
    shown = f"{name}={value[:100]!r}" if isinstance(value, str) else name
    if error["type"] == "unknown_method":
        return UnknownMethod(error["msg"])
    field = kind.model_fields.get(name)
    annotation = field.annotation if field is not None else None
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return InvalidParameter(
            f"{shown} is not one of {', '.join(str(m.value) for m in annotation)}")
    low, high = _bounds(field)
    if annotation is float:
        if error["type"] == "float_parsing":
            return InvalidParameter(f"{shown} is not a number")
        return InvalidParameter(f"{shown} must be between {low} and {high}")
    if annotation is int:
        return InvalidParameter(f"{shown} must be an integer from {low} to {high}")
    return InvalidParameter(f"{shown}: {error['msg']}")


def _bounds(field: Any) -> tuple[object, object]:
    """A field's ge and le constraints (None where it has none)."""
    low = high = None
    for item in getattr(field, "metadata", ()):
        low = getattr(item, "ge", low)
        high = getattr(item, "le", high)
    return low, high


def parameter_schemas(kind: type[PredictParams]) -> dict[str, dict[str, Any]]:
    """Each parameter's JSON schema, self-contained (enums inlined), for OpenAPI."""
    document = kind.model_json_schema()
    definitions = document.get("$defs", {})
    out: dict[str, dict[str, Any]] = {}
    for name, schema in document["properties"].items():
        schema = dict(schema)
        schema.pop("title", None)
        ref = schema.pop("$ref", None)
        if ref is not None:
            target = dict(definitions[ref.rsplit("/", 1)[1]])
            target.pop("title", None)
            schema = {**target, **schema}
        if isinstance(schema.get("default"), list):  # a comma list travels as one string
            schema["default"] = ",".join(schema["default"])
        if schema.get("default", "") is None:  # absent means "the service decides"
            del schema["default"]
        out[name] = schema
    return out


@dataclass(frozen=True)
class Upload:
    """An upload's image bytes, their declared type, and the parsed parameters."""

    data: bytes
    media_type: str | None
    params: Any


async def read_upload(request: Request, settings: Settings, kind: type[PredictParams]) -> Upload:
    """The image bytes, their declared type and the parameters (query and form fields).

    Raises:
        InvalidParameter, UnknownMethod: for unknown, repeated or bad parameters.
        EmptyBody, InvalidMultipart, PayloadTooLarge: for unusable bodies.
    """
    pairs = list(request.query_params.multi_items())
    body = await read_body(request, settings)
    content_type = request.headers.get("content-type")
    media_type = content_type.split(";")[0].strip().lower() if content_type else None
    if media_type == "multipart/form-data":
        form = await read_form(body, content_type or "")
        pairs += form.fields
        assert form.file is not None
        body, media_type = form.file.data, form.file.content_type
    if not body:
        raise EmptyBody("the request carries no image (empty body or empty file part)")
    return Upload(body, media_type, parse_params(kind, pairs))


__all__ = ["ExplainParams", "PredictParams", "Upload", "parameter_schemas",
           "parse_params", "read_upload"]
