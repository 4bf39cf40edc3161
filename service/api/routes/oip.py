"""The Open Inference Protocol V2 (KServe V2, Triton's HTTP API), over the pipeline that
serves /predict and /explain.

A model takes one of two inputs: ``image``, a BYTES tensor of one element holding the
encoded image (DICOM, PNG or JPEG; base64 in JSON, raw bytes with the binary tensor data
extension), or ``tensor``, an FP32 tensor already preprocessed to the network's input
(shape ``[1, C, H, W]`` or ``[1, H, W, C]`` as ``model.toml`` lays it out, normalised).
The answer is ``scores`` (FP32 ``[1, labels]``, as /predict reports them) and, when the
request's parameters name ``methods``, one FP32 tensor per method, ``[1, maps, H, W]``,
the raw maps as /explain's ``heatmap=npy`` gives them on the same ``size`` grid; each map
output's parameters name the classes of its maps. The other request parameters are
/explain's (``classes``, ``target``, ``size``, ``score_threshold``, ``window``, ...).

Binary tensor data (https://github.com/triton-inference-server/server/blob/main/docs/
protocol/extension_binary_data.md) is what tritonclient sends and asks for by default: the
body is the JSON header (``Inference-Header-Content-Length`` bytes) followed by the
tensors' bytes, little-endian, BYTES elements each behind a 4-byte length.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from fastapi import APIRouter, Request, Response

from schemas.protocols import (
    BASE64,
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2RequestInput,
    V2ServerMetadata,
    V2TensorMetadata,
)
from service import __version__, outputs, pipeline
from service.api.body import parse_inference_json, read_inflated_body
from service.api.deps import (
    AdmissionDep,
    ApiKey,
    LimiterDep,
    MetricsDep,
    RepositoryDep,
    SchedulerDep,
    SettingsDep,
)
from service.api.docs import ERRORS, body_schema
from service.api.metrics import label_model
from service.api.paths import OIP_V2
from service.api.request import ExplainParams, parameter_schemas, parse_params
from service.api.routes.explain import compute, decode_upload, input_size
from service.config import Settings
from service.errors import (
    InvalidInferenceRequest,
    InvalidParameter,
    OutputNotComputed,
    TensorMismatch,
    UnknownModel,
)
from service.imaging.base import DecodedImage
from service.imaging.preprocess import ModelInput, from_tensor
from service.methods import METHODS
from service.methods.maps import resize
from service.models.ensemble import Ensemble
from service.models.repository import Repository, Served
from service.outputs.base import Packaging
from service.outputs.limit import AnswerLimit, spend
from service.outputs.render import Size

router = APIRouter(prefix=OIP_V2, tags=["open-inference-protocol-v2"])

IMAGE: Final[str] = "image"
TENSOR: Final[str] = "tensor"
SCORES: Final[str] = "scores"
HEADER_LENGTH: Final[str] = "Inference-Header-Content-Length"
OCTET_STREAM: Final[str] = "application/octet-stream"
FP32_MAX: Final[float] = float(np.finfo(np.float32).max)
# Values a JSON answer may hold: each costs ~60 bytes while it is written (a Python float
# in a list, then its text), so 2^21 of them ~120 MB, about the decode budget of a request.
# The network's grid fits (demo-cxr: every method for every label is 1.6 M); a 1841 × 1955
# radiograph's map at size=original (3.6 M) travels as binary data.
MAX_JSON_VALUES: Final[int] = 1 << 21
_BYTE_COUNT: Final[re.Pattern[str]] = re.compile(r"[0-9]{1,20}")
_COMPONENT: Final[str] = "#/components/schemas/{}"
# Request parameters tritonclient and Triton reserve; none changes what is computed here.
_RESERVED: Final[frozenset[str]] = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
     "binary_data_output", "headers"})
# /explain's parameters that mean something here: the model is the path's, and the map
# encoding and DICOM object are /explain's packaging, not tensors.
_PARAMETERS: Final[frozenset[str]] = frozenset(ExplainParams.model_fields) - {
    "model", "heatmap", "dicom"}
_MODEL_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    k: ERRORS[k] for k in (401, 404)}


@router.get("", response_model=V2ServerMetadata, summary="Server metadata (OIP V2)")
async def v2_server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="medexplain", version=__version__,
                            extensions=["binary_tensor_data"])


@router.get("/health/live", response_model=V2Live, summary="The server is live (OIP V2)")
async def v2_server_live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready,
            responses={503: {"model": V2Ready,
                             "description": "draining, no model, or overloaded"}},
            summary="The server is ready: models loaded, room, not draining (OIP V2)")
async def v2_server_ready(repository: RepositoryDep, limiter: LimiterDep,
                          admission: AdmissionDep) -> Response:
    # What /readyz decides, in the protocol's words.
    ready = (not admission.draining and bool(repository.models)
             and not limiter.is_overloaded() and not admission.is_overloaded())
    return Response(V2Ready(ready=ready).model_dump_json(), media_type="application/json",
                    status_code=200 if ready else 503)


@router.get("/models/{name}/ready", response_model=V2ModelReady, dependencies=[ApiKey],
            responses=_MODEL_ERRORS, summary="One model is ready (OIP V2)")
async def v2_model_ready(name: str, request: Request,
                         repository: RepositoryDep) -> V2ModelReady:
    model = repository.get(name)
    label_model(request, model.name)
    return V2ModelReady(name=model.name, ready=True)


@router.get("/models/{name}", response_model=V2ModelMetadata, dependencies=[ApiKey],
            responses=_MODEL_ERRORS, summary="Model metadata: inputs, outputs (OIP V2)")
async def v2_model_metadata(name: str, request: Request,
                            repository: RepositoryDep) -> V2ModelMetadata:
    model = repository.get(name)
    label_model(request, model.name)
    inputs = [V2TensorMetadata(name=IMAGE, datatype="BYTES", shape=[1])]
    if not isinstance(model, Ensemble):  # each member has its own network input
        spec = model.config.input
        hw = [spec.height, spec.width]
        shape = ([1, spec.channels, *hw] if spec.layout.value == "NCHW"
                 else [1, *hw, spec.channels])
        inputs.append(V2TensorMetadata(name=TENSOR, datatype="FP32", shape=shape))
    unavailable = {n for m in model.members for n in m.unavailable}
    outputs_ = [V2TensorMetadata(name=SCORES, datatype="FP32",
                                 shape=[1, len(model.config.labels)])]
    outputs_ += [V2TensorMetadata(name=n, datatype="FP32", shape=[1, -1, -1, -1])
                 for n in METHODS if n not in unavailable]
    return V2ModelMetadata(
        name=model.name, versions=[model.config.version],
        platform="ensemble" if isinstance(model, Ensemble) else "onnxruntime_onnx",
        inputs=inputs, outputs=outputs_, labels=list(model.config.labels))


_INFER_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    **ERRORS, 200: {"description": "JSON, or with binary outputs the JSON header then the "
                                   "tensors' bytes", "content": {OCTET_STREAM: {}}}}


def _document_infer_request(schemas: dict[str, Any], settings: Settings) -> None:
    """The JSON body as :func:`v2_model_infer` reads it: one input, ``image`` (one base64
    string) or ``tensor`` (FP32 numbers, flat), the request parameters /explain's with
    their JSON types, outputs by name. A binary body's JSON header may carry
    binary_data_size besides; the JSON body may not (it has no bytes after it)."""
    request = schemas["V2InferRequest"]["properties"]
    request["inputs"].update(minItems=1, maxItems=1)
    queries = parameter_schemas(ExplainParams)
    request["parameters"] = {
        "type": "object", "additionalProperties": False,
        "description": "/explain's parameters (methods names the maps wanted) with the "
                       "same values and JSON types, and the parameters Triton reserves "
                       "(ignored)",
        "properties": {**{n: queries[n] for n in queries if n in _PARAMETERS},
                       **{n: {} for n in sorted(_RESERVED)},
                       "binary_data_output": {"type": "boolean"}}}

    def no_binary() -> dict[str, Any]:
        return {"type": "object", "not": {"required": ["binary_data_size"]}}

    schemas["V2ImageInput"] = {
        "type": "object", "additionalProperties": False,
        "required": ["name", "shape", "datatype", "data"],
        "description": "the encoded image (DICOM, PNG or JPEG): one element, base64",
        "properties": {"name": {"const": IMAGE}, "datatype": {"const": "BYTES"},
                       "shape": {"type": "array", "items": {"const": 1}},
                       "parameters": no_binary(),
                       "data": {"type": "array", "minItems": 1, "maxItems": 1,
                                "items": BASE64}}}
    schemas["V2TensorInput"] = {
        "type": "object", "additionalProperties": False,
        "required": ["name", "shape", "datatype", "data"],
        "description": "the network input, preprocessed: its shape and layout are the model's "
                       "(GET /v2/models/{name}: inputs; 400 tensor_mismatch for another), "
                       "the data flat in row-major order",
        "properties": {"name": {"const": TENSOR}, "datatype": {"const": "FP32"},
                       "shape": {"type": "array", "items": {"type": "integer"}},
                       "parameters": no_binary(),
                       "data": {"type": "array", "items": {
                           "type": "number", "minimum": -FP32_MAX, "maximum": FP32_MAX}}}}
    schemas["V2RequestInput"] = {"oneOf": [{"$ref": _COMPONENT.format("V2ImageInput")},
                                           {"$ref": _COMPONENT.format("V2TensorInput")}]}
    output = schemas["V2RequestOutput"]["properties"]
    output["name"] = {"enum": [SCORES, *METHODS],
                      "description": "scores, or a method's maps: one named in the request's "
                                     "methods parameter (400 output_not_computed otherwise)"}
    output["parameters"] = {"type": "object",
                            "properties": {"binary_data": {"type": "boolean"}}}


_INFER_BODY: Final[dict[str, Any]] = {"requestBody": {
    "required": True,
    "description": "JSON, or (binary tensor data) application/octet-stream: the JSON "
                   "header, as the JSON body but its inputs' parameters.binary_data_size "
                   "giving the bytes of their data after it, then those bytes; the "
                   "Inference-Header-Content-Length header gives the JSON's length "
                   "(without it the whole body is the JSON)",
    "content": {
    "application/json": {"schema": body_schema(V2InferRequest, _document_infer_request)},
    OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/models/{name}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
             responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY,
             summary="Scores, and maps when parameters name methods (OIP V2)")
async def v2_model_infer(name: str, request: Request, settings: SettingsDep,
                         repository: RepositoryDep, limiter: LimiterDep,
                         scheduler: SchedulerDep, metrics: MetricsDep) -> Response:
    model = repository.get(name)
    label_model(request, model.name)
    body = await read_inflated_body(request, settings)
    infer, blobs = _parse(body, request.headers.get(HEADER_LENGTH), _max_values(model))
    given = _tensor_input(infer, blobs, model)
    params, explaining = _params(infer.parameters)
    options = (outputs.JSON_OUTPUT.options(params, model, Packaging.JSON) if explaining
               else None)

    def prepare() -> pipeline.Job:
        watch = pipeline.Stopwatch()
        if isinstance(given, ModelInput):  # already the network's input: nothing to do
            return pipeline.Job(_tensor_image(given), (given,), options, watch)
        image = decode_upload(given, None, params, settings, model,
                              input_size(model, settings))
        watch.lap("decode")
        return pipeline.prepare(model, image, options, watch)

    def finish(computed: pipeline.Computed) -> Response:
        result = pipeline.finish(model, computed)
        metrics.observe_methods(result)
        with AnswerLimit(settings.max_answer_bytes).applied():
            return _answer(infer, _tensors(result, params.size), model)

    async with limiter.admit():
        job = await limiter.run(prepare)
        computed = await compute(scheduler, model, job)
        return await limiter.run(finish, computed)


# ---- The same, with the model's version in the path (tritonclient's model_version) ----


def _check_version(name: str, version: str, repository: Repository) -> None:
    """Raises: UnknownModel for a version the model does not have (each serves one)."""
    model = repository.get(name)
    if version != model.config.version:
        raise UnknownModel(f"model {model.name!r} has version {model.config.version!r}, "
                           f"not {version[:20]!r}")


@router.get("/models/{name}/versions/{version}/ready", response_model=V2ModelReady,
            dependencies=[ApiKey], responses=_MODEL_ERRORS,
            summary="One model version is ready (OIP V2)")
async def v2_model_version_ready(name: str, version: str, request: Request,
                                 repository: RepositoryDep) -> V2ModelReady:
    _check_version(name, version, repository)
    return await v2_model_ready(name, request, repository)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata,
            dependencies=[ApiKey], responses=_MODEL_ERRORS,
            summary="Model version metadata (OIP V2)")
async def v2_model_version_metadata(name: str, version: str, request: Request,
                                    repository: RepositoryDep) -> V2ModelMetadata:
    _check_version(name, version, repository)
    return await v2_model_metadata(name, request, repository)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse,
             dependencies=[ApiKey], responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY,
             summary="Infer with one model version (OIP V2)")
async def v2_model_version_infer(name: str, version: str, request: Request,
                                 settings: SettingsDep, repository: RepositoryDep,
                                 limiter: LimiterDep, scheduler: SchedulerDep,
                                 metrics: MetricsDep) -> Response:
    _check_version(name, version, repository)
    return await v2_model_infer(name, request, settings, repository, limiter, scheduler,
                                metrics)


@dataclass(frozen=True)
class _Tensor:
    name: str
    values: np.ndarray  # float32
    parameters: dict[str, str | int | bool]


def _max_values(model: Served) -> int:
    """How many JSON values a request for ``model`` may hold: the network input's, twice,
    and room for the rest. Parsed, each value is a Python object of ~30 bytes, so a body
    of small values costs far more memory than its size: it is refused before parsing."""
    spec = model.members[0].config.input
    elements = 0 if isinstance(model, Ensemble) else spec.height * spec.width * spec.channels
    return 2 * elements + 10_000


def _parse(body: bytes, header_length: str | None,
           max_values: int) -> tuple[V2InferRequest, bytes]:
    """The JSON header and the binary data after it."""
    size = len(body)
    if header_length is not None:
        # ASCII digits only, and few: str.isdigit also takes "²", and int() refuses more
        # than 4,300 digits.
        text = header_length.strip()
        if not _BYTE_COUNT.fullmatch(text) or int(text) > len(body):
            raise InvalidInferenceRequest(f"{HEADER_LENGTH} must be a byte count no larger "
                                          f"than the body's {len(body)}")
        size = int(text)
    header = body[:size]
    # Every value after the first follows a comma (base64 holds none): a cheap upper bound.
    if header.count(b",") >= max_values:
        raise InvalidInferenceRequest(f"the JSON header holds more than {max_values} values; "
                                      "this model's tensors need fewer")
    infer = parse_inference_json(V2InferRequest, header,
                                 "the inference request's JSON is not valid")
    return infer, body[size:]


def _tensor_input(infer: V2InferRequest, blobs: bytes,
                  model: Served) -> bytes | ModelInput:
    """The encoded image, or the network input, from the request's one input tensor."""
    if len(infer.inputs) != 1:
        raise InvalidInferenceRequest(f"give exactly one input ({IMAGE} or {TENSOR}), not "
                                      f"{len(infer.inputs)}")
    given = infer.inputs[0]
    raw = _binary(given, blobs)
    if given.name == IMAGE:
        _expect(given, "BYTES")
        if any(dimension != 1 for dimension in given.shape):
            raise InvalidInferenceRequest(f"{IMAGE} holds one image: shape [1], not "
                                          f"{given.shape}")
        return _one_bytes_element(raw) if raw is not None else _one_b64_element(given.data)
    if given.name == TENSOR:
        _expect(given, "FP32")
        if isinstance(model, Ensemble):
            raise TensorMismatch(f"ensemble {model.name!r} takes the {IMAGE} input only: "
                                 "each member has its own network input")
        return _network_input(given, raw, model)
    raise InvalidInferenceRequest(f"unknown input {given.name[:100]!r}; the inputs are "
                                  f"{IMAGE} (BYTES) and {TENSOR} (FP32)")


def _expect(given: V2RequestInput, datatype: str) -> None:
    if given.datatype != datatype:
        raise InvalidInferenceRequest(f"input {given.name} is {datatype}, not "
                                      f"{given.datatype[:20]!r}")


def _binary(given: V2RequestInput, blobs: bytes) -> bytes | None:
    """The tensor's bytes when it travels as binary data (one input: all of them)."""
    size = given.parameters.get("binary_data_size")
    if size is not None and given.data is not None:
        raise InvalidInferenceRequest(f"input {given.name} has both data and "
                                      "parameters.binary_data_size: give one")
    if size is None:
        if given.data is None:
            raise InvalidInferenceRequest(f"input {given.name} has neither data nor "
                                          "parameters.binary_data_size")
        return None
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidInferenceRequest(f"input {given.name}'s binary_data_size is a JSON integer")
    if size != len(blobs):
        raise InvalidInferenceRequest(f"input {given.name}'s binary_data_size does not match "
                                      f"the {len(blobs)} bytes after the JSON header")
    return blobs


def _one_bytes_element(raw: bytes) -> bytes:
    """A BYTES tensor of one element in binary form: a 4-byte little-endian length, then
    the bytes."""
    if len(raw) < 4 or struct.unpack("<I", raw[:4])[0] != len(raw) - 4:
        raise InvalidInferenceRequest(f"{IMAGE}'s binary data is not one BYTES element (a "
                                      "4-byte little-endian length, then the bytes)")
    return raw[4:]


def _one_b64_element(data: list[Any] | None) -> bytes:
    """A BYTES element in JSON: raw image bytes are no text, so they travel as base64, in a
    flat list of one (as tritonclient sends it)."""
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
        raise InvalidInferenceRequest(f"{IMAGE}'s data is one base64 string: [\"...\"]")
    try:
        return base64.b64decode(data[0], validate=True)
    # binascii.Error for bad base64; a plain ValueError for a non-ASCII string.
    except ValueError as exc:
        raise InvalidInferenceRequest(f"{IMAGE}'s data is not valid base64") from exc


def _network_input(given: V2RequestInput, raw: bytes | None, model: Served) -> ModelInput:
    spec = model.members[0].config.input
    count = int(np.prod(given.shape)) if given.shape else 0
    if raw is not None:
        if len(raw) != 4 * count:
            raise TensorMismatch(f"{TENSOR}'s binary data has {len(raw)} bytes; shape "
                                 f"{given.shape} in FP32 needs {4 * count}")
        values = np.frombuffer(raw, dtype="<f4")
    else:
        data = given.data or []
        # Flat numbers, as the document states and tritonclient sends them (a bool is an
        # int to Python, not a number to JSON).
        if any(type(v) not in (int, float) for v in data):
            raise InvalidInferenceRequest(f"{TENSOR}'s data are not a flat list of numbers")
        try:
            wide = np.asarray(data, dtype=np.float64)
        except OverflowError as exc:  # an integer past float64's range
            raise InvalidInferenceRequest(f"{TENSOR}'s data are beyond FP32's range") from exc
        if wide.size and np.abs(wide).max() > FP32_MAX:
            raise InvalidInferenceRequest(f"{TENSOR}'s data are beyond FP32's range")
        values = wide.astype(np.float32)
        if values.size != count:
            raise TensorMismatch(f"{TENSOR} has {values.size} values; shape {given.shape} "
                                 f"needs {count}")
    if not np.isfinite(values).all():
        raise InvalidInferenceRequest(f"{TENSOR} holds NaN or infinite values")
    try:
        return from_tensor(values.reshape(given.shape), spec)
    except ValueError as exc:
        raise TensorMismatch(f"{TENSOR}: {exc}") from exc


def _tensor_image(model_input: ModelInput) -> DecodedImage:
    """A preprocessed tensor's image is the network's grid: maps, regions and the size
    parameter's 'original' grid are that grid."""
    return DecodedImage(pixels=model_input.image01, format="tensor")


# Each parameter's JSON type, as the document states it: a JSON body carries typed values,
# where a query string has only text.
_JSON_TYPES: Final[dict[str, str]] = {
    name: schema["type"] for name, schema in parameter_schemas(ExplainParams).items()
    if name in _PARAMETERS}


def _as_text(name: str, value: object) -> str:
    """A typed parameter value as the text /explain's parameters are read from.

    Raises:
        InvalidParameter: a value of another JSON type than the parameter's.
    """
    kind = _JSON_TYPES[name]
    if kind == "boolean" and isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, bool):
        if kind == "string" and isinstance(value, str):
            return value
        if kind == "number" and isinstance(value, int | float):
            return str(value)
        # JSON Schema's integer includes 2.0: a number with no fractional part.
        if kind == "integer" and (isinstance(value, int)
                                  or isinstance(value, float) and value.is_integer()):
            return str(int(value))
    raise InvalidParameter(f"parameter {name!r} is a JSON {kind} here (a list as a "
                           "comma-separated string)")


def _params(given: dict[str, Any]) -> tuple[ExplainParams, bool]:
    """/explain's parameters from the request's; whether any method is asked for."""
    pairs = []
    for name, value in given.items():
        if name in _RESERVED:
            if name == "binary_data_output" and not isinstance(value, bool):
                raise InvalidParameter("parameter 'binary_data_output' is a JSON boolean")
            continue
        if name not in _PARAMETERS:
            raise InvalidParameter(f"unknown parameter {name[:100]!r}; infer takes "
                                   f"{', '.join(sorted(_PARAMETERS))}")
        pairs.append((name, _as_text(name, value)))
    params: ExplainParams = parse_params(ExplainParams, pairs)
    return params, "methods" in given


def _tensors(result: pipeline.Result, size: Size) -> list[_Tensor]:
    labels = result.model.config.labels
    scores = np.array([[result.score(i) for i in range(len(labels))]], dtype=np.float32)
    out = [_Tensor(SCORES, scores, {})]
    for method in dict.fromkeys(m.method for m in result.maps):
        maps = [m for m in result.maps if m.method == method]
        grid = [_on_grid(m, result, size) for m in maps]
        indices = [m.index for m in maps]
        stacked = np.stack(grid)[np.newaxis].astype(np.float32, copy=False)
        spend(stacked.nbytes)
        out.append(_Tensor(method, stacked, {
            "classes": ",".join("" if i is None else str(i) for i in indices),
            "labels": ",".join(result.label(i) or "" for i in indices),
        }))
    return out


def _on_grid(m: pipeline.Map, result: pipeline.Result, size: Size) -> np.ndarray:
    """The raw map on the grid ``size`` names, as /explain's heatmap=npy gives it."""
    if size is Size.ORIGINAL:
        return resize(m.values, result.image.height, result.image.width)
    if size is Size.MODEL:
        return resize(m.values, *result.model.grid)
    return m.values


def _answer(infer: V2InferRequest, tensors: list[_Tensor], model: Served) -> Response:
    """JSON, or the JSON header followed by the binary outputs."""
    by_name = {t.name: t for t in tensors}
    binary_default = bool(infer.parameters.get("binary_data_output", False))
    if not infer.outputs:  # none requested (absent or []): every output, as Triton does
        wanted = [(t, binary_default) for t in tensors]
    else:
        wanted = []
        for requested in infer.outputs:
            if requested.name not in by_name:
                raise OutputNotComputed(
                    f"output {requested.name[:100]!r} is not computed for this request; "
                    f"its outputs are {', '.join(by_name)} (maps need the methods parameter)")
            if any(t.name == requested.name for t, _ in wanted):
                raise InvalidInferenceRequest(f"output {requested.name} is asked for twice")
            if "classification" in requested.parameters:
                # Triton's classification extension answers BYTES "score:index:label"
                # values in place of the tensor: silently ignoring it would hand back FP32.
                raise InvalidInferenceRequest(
                    f"output {requested.name}: the classification extension is not served; "
                    f"{SCORES} holds every label's score, and the model metadata its labels")
            binary = requested.parameters.get("binary_data", binary_default)
            if not isinstance(binary, bool):
                raise InvalidInferenceRequest(f"output {requested.name}'s binary_data is a "
                                              "JSON boolean")
            wanted.append((by_name[requested.name], bool(binary)))
    in_json = sum(tensor.values.size for tensor, binary in wanted if not binary)
    if in_json > MAX_JSON_VALUES:
        raise InvalidInferenceRequest(
            f"the outputs asked for as JSON hold {in_json} values, more than the "
            f"{MAX_JSON_VALUES} a JSON answer may: ask for them as binary data "
            "(binary_data_output, or an output's binary_data) or on a smaller grid (size)")
    blobs: list[bytes] = []
    entries = []
    for tensor, binary in wanted:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": "FP32",
                                 "shape": list(tensor.values.shape),
                                 "parameters": dict(tensor.parameters)}
        if binary:
            data = tensor.values.astype("<f4", copy=False).tobytes()
            entry["parameters"]["binary_data_size"] = len(data)
            blobs.append(data)
        else:
            entry["data"] = tensor.values.ravel().tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.config.version}
    if infer.id is not None:
        header["id"] = infer.id
    header["outputs"] = entries
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *blobs]), media_type=OCTET_STREAM,
                    headers={HEADER_LENGTH: str(len(text))})
