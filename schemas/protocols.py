"""Bodies of the inference protocols served beside medexplain's own API: KServe V1
(TensorFlow Serving's REST API) and the Open Inference Protocol V2 (KServe V2, Triton).

Members are named as the protocols name them, so their clients read them unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

# ---- KServe V1 ----


# Base64 text: the document says so (OpenAPI 3.1's contentEncoding, 3.0's format byte).
BASE64: dict[str, Any] = {"type": "string", "contentEncoding": "base64", "format": "byte"}


# TensorFlow Serving's encoding of binary data in JSON: {"b64": "<base64>"}.
class B64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: Annotated[str, WithJsonSchema(BASE64)] = Field(
        description="the encoded image (DICOM, PNG or JPEG), base64")


# One instance: {"image_bytes": {"b64": ...}} as TF-Serving and KServe image models take
# it, or the bare {"b64": ...} of a model with one input; exactly one of the two, not null.
def _one_image(schema: dict[str, Any]) -> None:
    """Exactly one of the members, neither with a default: absent is not null."""
    for member in schema["properties"].values():
        member.pop("default", None)
    schema["oneOf"] = [{"required": ["image_bytes"]}, {"required": ["b64"]}]


class V1Instance(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_image)

    # Null is no image: the document allows neither member to be null (SkipJsonSchema), and
    # the route refuses one that is.
    image_bytes: B64 | SkipJsonSchema[None] = None
    b64: Annotated[str, WithJsonSchema(BASE64)] | SkipJsonSchema[None] = None


class V1Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[V1Instance] = Field(
        description="one entry per image: at least one, at most the service's "
                    "max_instances (the document served states it as maxItems)",
        json_schema_extra={"minItems": 1})


class V1ModelsResponse(BaseModel):
    models: list[str]


class V1ModelReady(BaseModel):
    name: str
    ready: bool


# :predict: one /predict answer per instance, in order.
class V1PredictResponse(BaseModel):
    predictions: list[dict[str, Any]] = Field(
        description="per instance, the body /predict answers for that image")


# :explain: per instance, the scores (as :predict) and the /explain answer.
class V1ExplainResponse(BaseModel):
    predictions: list[dict[str, Any]] = Field(
        description="per instance, the body /predict answers for that image")
    explanations: list[dict[str, Any]] = Field(
        description="per instance, the body /explain answers for that image")


# ---- Open Inference Protocol V2 ----


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


# A tensor's name, type and shape (-1: any size along that axis).
class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata] = Field(description="give exactly one of them")
    outputs: list[V2TensorMetadata]
    labels: list[str] = Field(description="medexplain's addition: the label of each score, "
                                          "in the order of the scores tensor's last axis")


# A request's input tensor: data inline, or (binary tensor data extension) in the body
# after the JSON header, its size in parameters.binary_data_size.
class V2RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class V2RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[V2RequestInput]
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2ResponseOutput]


__all__ = [
    "B64", "BASE64", "V1ExplainResponse", "V1Instance", "V1ModelReady", "V1ModelsResponse",
    "V1PredictResponse", "V1Request", "V2InferRequest", "V2InferResponse", "V2Live",
    "V2ModelMetadata", "V2ModelReady", "V2Ready", "V2RequestInput", "V2RequestOutput",
    "V2ResponseOutput", "V2ServerMetadata", "V2TensorMetadata",
]
