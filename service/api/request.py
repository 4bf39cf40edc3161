"""The parameters of /predict and /explain: one pydantic model each, written once.

Query parameters and multipart form fields are the same parameters; both are read from
strings by these models, which also give the OpenAPI document its parameter and form
schemas (:func:`parameter_schemas`): what the models check is what the document states
(enums, patterns, bounds, lengths), so a value the document allows is never refused for its
form. Values are read as sent: enum values and method names in lower case, an empty value
only where the document allows one (``model``, ``classes``, ``window``: the default). A
parameter given twice (in the query and as a form field, or twice in one of them) is
refused rather than one silently preferred.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
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

from service.api.body import read_form, read_inflated_body
from service.config import Settings
from service.errors import EmptyBody, InvalidParameter, RepeatedParameter, UnknownMethod
from service.methods import METHODS, Target
from service.outputs import DICOM_OUTPUTS, DicomObject
from service.outputs.render import Encoding, Size
from service.pipeline import ExplainOptions

# Every parameter's value is at most this many characters (a comma list of many labels
# fits); the document states it as maxLength.
MAX_VALUE_CHARS = 10_000


def _one_of(names: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def _comma_list_of(item: str) -> str:
    """A pattern for a comma list of ``item``; spaces around the items are allowed."""
    return f"^ *{item} *(?:, *{item} *)*$"


# The patterns are both the document's (ECMA 262, as JSON Schema reads them) and what the
# server checks (re.fullmatch): explicit ASCII classes only, as Python's \d and \s also
# match non-ASCII digits and spaces, and ECMA's do not.
METHODS_PATTERN = _comma_list_of(_one_of(METHODS))
DICOM_PATTERN = _comma_list_of(_one_of(DICOM_OUTPUTS))
_NUMBER = r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,2})?"
# A number > 0: a non-zero digit in the integer or the fraction part. The digit and exponent
# counts are bounded, so both numbers are finite and the width never rounds to 0.
_POSITIVE = (r"\+?(?:[0-9]{0,20}[1-9][0-9]{0,20}(?:\.[0-9]{0,20})?"
             r"|[0-9]{0,20}\.[0-9]{0,20}[1-9][0-9]{0,20})(?:[eE][+-]?[0-9]{1,2})?")
# Empty: the file's own VOI LUT or window, as when absent.
WINDOW_PATTERN = f"^(?:|none|{_NUMBER} *, *{_POSITIVE})$"
_WINDOW = re.compile(WINDOW_PATTERN)
_METHODS = re.compile(METHODS_PATTERN)
_DICOM = re.compile(DICOM_PATTERN)


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


def _empty_is_default(value: object) -> object:
    """'' means the parameter's default (None) for the free-text parameters."""
    return None if value == "" else value


def _names(value: object, pattern: re.Pattern[str], known: Collection[str],
           refusal: Callable[[list[str], object], PydanticCustomError]) -> object:
    """A comma list as ``pattern`` states it (or, from Python, a sequence of names) → the
    names, each once, in order; ``refusal(names, value)`` is raised unless there is at
    least one and each is in ``known``. Another type is left to pydantic to refuse."""
    if isinstance(value, str):
        names = [item.strip(" ") for item in value.split(",")]
        valid = bool(pattern.fullmatch(value))
    elif isinstance(value, tuple | list):
        names = [str(name) for name in value]
        valid = bool(names) and all(name in known for name in names)
    else:
        return value
    if not valid:
        raise refusal(names, value)
    return tuple(dict.fromkeys(names))


def _unknown_method(names: list[str], value: object) -> PydanticCustomError:
    unknown = next((n for n in names if n not in METHODS), value)
    return PydanticCustomError(
        "unknown_method", "unknown method {name}; available: {available}",
        {"name": repr(str(unknown)[:100]), "available": ", ".join(METHODS)})


def _not_dicom_objects(names: list[str], value: object) -> PydanticCustomError:
    return PydanticCustomError("dicom_objects", "is not a comma list of {available}",
                               {"available": ", ".join(DICOM_OUTPUTS)})


def _methods(value: object) -> object:
    return _names(value, _METHODS, METHODS, _unknown_method)


def _dicom_objects(value: object) -> object:
    return _names(value, _DICOM, DICOM_OUTPUTS, _not_dicom_objects)


def _window(value: object) -> object:
    """'center,width' → (center, width); 'none' stays; '' is None (the file's own); anything
    else is refused."""
    if not isinstance(value, str):
        return value
    if not _WINDOW.fullmatch(value):
        raise PydanticCustomError(
            "window", "must be 'center,width' (numbers, width > 0) or 'none'")
    if value in ("", "none"):
        return value or None
    center, width = (float(v) for v in value.split(","))
    return (center, width)


CommaList = Annotated[tuple[str, ...], BeforeValidator(_comma_list)]
Window = Annotated[
    tuple[float, float] | Literal["none"] | None,
    BeforeValidator(_window),
    WithJsonSchema({"type": "string", "pattern": WINDOW_PATTERN, "maxLength": MAX_VALUE_CHARS,
                    "examples": ["40,400", "none"]}),
]


class PredictParams(BaseModel):
    """What /predict takes besides the image; /explain takes these too."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: Annotated[str | None, BeforeValidator(_empty_is_default),
                     WithJsonSchema({"type": "string", "maxLength": MAX_VALUE_CHARS})] = Field(
        None, description="model name (404 unknown_model when no served model has it); "
                          "empty or absent: the default model")
    frame: int = Field(0, ge=0, le=2**31 - 1,
                       description="0-based frame of a multi-frame DICOM (422 "
                                   "frame_out_of_range past the upload's last frame; PNG and "
                                   "JPEG have frame 0 only)")
    window: Window = Field(
        None, description="DICOM window 'center,width' (width > 0) overriding the file's VOI "
                          "LUT/window, or 'none' for min-max scaling; empty or absent: the "
                          "file's own")


class ExplainParams(PredictParams):
    """What /explain takes besides the image."""

    methods: Annotated[tuple[str, ...], BeforeValidator(_methods),
                       WithJsonSchema({"type": "string", "pattern": METHODS_PATTERN,
                                       "maxLength": MAX_VALUE_CHARS})] = Field(
        ("gradcam", "crm"),
        description=f"comma list of {', '.join(METHODS)} (lower case; a repeated name counts "
                    "once). A method the model cannot serve (GET /models/{name}: "
                    "unavailable_methods) gets 422 unknown_method")
    classes: Annotated[CommaList | None, BeforeValidator(_empty_is_default),
                       WithJsonSchema({"type": "string", "maxLength": MAX_VALUE_CHARS})] = Field(
        None, description="comma list of the model's labels (GET /models/{name}: labels) or "
                          "0-based indices; another name or an index past the last label "
                          "gets 422 unknown_label. Empty or absent: labels with score >= "
                          "score_threshold, at least the top one")
    heatmap: Encoding = Field(
        Encoding.PNG, description="png: 8-bit max-normalised map (PNG); npy: base64 .npy "
                                  "float32 raw map; overlay: the map in colour over the "
                                  "image (JPEG)")
    size: Size = Field(
        Size.MODEL, description="grid of the returned map: model: the network input's "
                                "(small; stretch it onto the image); original: the uploaded "
                                "image's; feature: the target layer's (CAM-type maps only: 422 "
                                "incompatible_parameters with another method or an ensemble)")
    target: Target = Field(Target.LOGIT,
                           description="which score is differentiated or perturbed")
    region_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                    description="cut on the max-normalised map for region boxes")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                   description="score from which a label is explained by default")
    dicom: Annotated[tuple[DicomObject, ...], BeforeValidator(_dicom_objects),
                     WithJsonSchema({"type": "string", "pattern": DICOM_PATTERN,
                                     "maxLength": MAX_VALUE_CHARS})] = Field(
        (next(iter(DicomObject)),),
        description="comma list of the DICOM objects of a DICOM answer (Accept: "
                    "application/dicom or multipart/related; type=\"application/dicom\"): "
                    + "; ".join(f"{name}: {o.summary}" for name, o in DICOM_OUTPUTS.items())
                    + ". Several (a repeated name counts once) are computed once and "
                      "answered as the parts of one multipart/related, in the order given; "
                      "application/dicom holds one (406 not_acceptable). Ignored for JSON.")
    preview: bool = Field(
        False, description="JSON only: also return the image as the network saw it "
                           "(windowed, MONOCHROME1 inverted) as an 8-bit grey PNG on the maps' "
                           "grid (the model's for size=feature), for clients that cannot "
                           "decode the upload, as a browser cannot decode DICOM")

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
    """A parameters model from (name, value) strings.

    Raises:
        InvalidParameter: an unknown name, a value over ``MAX_VALUE_CHARS`` or a bad value.
        RepeatedParameter: a name given more than once.
        UnknownMethod: ``methods`` not a comma list of method names.
    """
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in kind.model_fields:
            known = ", ".join(kind.model_fields)
            raise InvalidParameter(
                f"unknown parameter {name[:100]!r}; this endpoint takes {known}")
        if name in values:
            raise RepeatedParameter(
                f"parameter {name!r} is given more than once (as a query parameter and a "
                "form field, or repeated); give it once")
        if len(value) > MAX_VALUE_CHARS:
            raise InvalidParameter(f"parameter {name!r} is longer than {MAX_VALUE_CHARS} "
                                   "characters")
        values[name] = value
    try:
        return kind.model_validate(values)
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
    if error["type"] == "dicom_objects":
        return InvalidParameter(f"{shown} {error['msg']}")
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
        EmptyBody, InvalidMultipart, InvalidContentEncoding, PayloadTooLarge: for unusable
            bodies.
        UnsupportedMediaType: a Content-Encoding other than gzip or deflate.
    """
    pairs = list(request.query_params.multi_items())
    body = await read_inflated_body(request, settings)
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
