"""Request and response bodies. Coordinates are always original-image pixels."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


# A model's identity in responses.
class ModelRef(BaseModel):
    name: str
    version: str


# Non-identifying DICOM facts echoed for correlation (never patient data).
class DicomInfo(BaseModel):
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    modality: str | None = None
    transfer_syntax_uid: str | None = None
    photometric_interpretation: str | None = None
    frames: int = 1
    frame: int = 0


# The uploaded image as decoded.
class ImageInfo(BaseModel):
    width: int = Field(description="the upload's width in pixels, as shown: a PNG's or "
                                   "JPEG's EXIF orientation applied")
    height: int = Field(description="the upload's height in pixels, as shown")
    format: str = Field(description="png, jpeg or dicom")
    dicom: DicomInfo | None = None


# One label's score.
class Prediction(BaseModel):
    label: str
    index: int
    score: float


# A map as delivered: on the grid `size` asked for (width x height), which a client stretches
# onto the image (image.width x image.height) when they differ.
class Heatmap(BaseModel):
    encoding: str = Field(description="png (8-bit, max-normalised magnitude), npy (float32, "
                                      "raw) or overlay (the map in colour over the image)")
    media_type: str = Field(description="what `data` decodes to: image/png, "
                                        "application/x-npy or image/jpeg (overlay)")
    width: int
    height: int
    data: str = Field(description="base64 of the encoded map")


# A highlighted region: [x0, y0, x1, y1] with x1, y1 exclusive; score = peak of the
# max-normalised map inside it.
class Region(BaseModel):
    box: list[int] = Field(min_length=4, max_length=4)
    score: float


class Explanation(BaseModel):
    method: str
    label: str | None = Field(description="the explained label; null for class-agnostic maps")
    index: int | None = None
    heatmap: Heatmap
    regions: list[Region]
    points: list[list[float]] | None = Field(
        None, description="image points [x, y] (CNN fixations only)"
    )


# The image as the network saw it (windowed; MONOCHROME1 inverted), for a client that cannot
# decode the upload itself: a browser showing a DICOM.
class ImagePreview(BaseModel):
    media_type: str = Field("image/png", description="what `data` decodes to")
    width: int
    height: int
    data: str = Field(description="base64 of an 8-bit grey PNG")


class ExplainResponse(BaseModel):
    model: ModelRef
    image: ImageInfo
    predictions: list[Prediction]
    explanations: list[Explanation]
    timings_ms: dict[str, float]
    preview: ImagePreview | None = Field(
        None, description="with preview=true: the image on the maps' grid (the model's for "
                          "size=feature); null otherwise")


class PredictResponse(BaseModel):
    model: ModelRef
    image: ImageInfo
    predictions: list[Prediction]
    timings_ms: dict[str, float]


class InputInfo(BaseModel):
    size: list[int] = Field(description="[height, width] fed to the network")
    channels: int
    mean: list[float]
    std: list[float]
    layout: str


class TargetLayerInfo(BaseModel):
    name: str = Field(description="the ONNX tensor; for a vision transformer its token "
                      "tensor (B, prefix + h·w, C), whose patch grid the shape gives")
    shape: list[int] = Field(description="[channels, height, width]")
    detected: bool = Field(description="true when auto-detected, false when set in model.toml")


# Everything a client needs to know about one served model (a network or an ensemble).
class AcceptsInfo(BaseModel):
    """The DICOM images a model is meant for (model.toml [accepts]); empty: any value."""

    modalities: list[str] = Field(description="Modality must be one of these")
    body_parts: list[str] = Field(
        description="Body Part Examined, when present, must be one of these")
    view_positions: list[str] = Field(
        description="View Position, when present, must be one of these")
    presentation_intents: list[str] = Field(
        description="Presentation Intent Type (DX, MG, IO images), when present, must be one "
                    "of these: FOR PRESENTATION leaves out the raw FOR PROCESSING images")


class CodeInfo(BaseModel):
    """A label's meaning in a coding scheme (model.toml [codes]), as the Structured Report
    codes its finding type."""

    scheme: str = Field(description="Coding Scheme Designator, e.g. SCT")
    value: str = Field(description="Code Value, e.g. 287272002")
    meaning: str = Field(description="Code Meaning, e.g. Cardiomegaly")


class ModelInfo(BaseModel):
    name: str
    version: str
    description: str
    default: bool
    labels: list[str]
    input: InputInfo | None = Field(description="null for an ensemble: see its members")
    activation: str | None = Field(description="null for an ensemble: see its members")
    target_layer: TargetLayerInfo | None = Field(
        description="null for an ensemble: see its members")
    methods: list[str]
    unavailable_methods: dict[str, str] = Field(
        default_factory=dict,
        description="methods this model cannot serve, each with the reason (e.g. an op "
                    "without a gradient rule in the backbone)")
    execution_providers: list[str]
    execution_fallback: str | None = Field(
        None, description="why the model runs on another execution provider than the one "
                          "asked for (CUDA requested but not usable here: CPU); null when "
                          "it runs where asked")
    sha256: str = Field(description="SHA-256 of model.onnx; for an export whose weights are "
                               "in external data files, of model.onnx and those files; "
                               "for an ensemble, of ensemble.toml and its members' digests")
    members: list[str] | None = Field(
        None, description="an ensemble's member models (scores and max-normalised maps "
                          "averaged over them); null for a single network")
    accepts: AcceptsInfo | None = Field(
        None, description="the DICOM images the model is meant for; any other DICOM gets "
                          "422 dicom_not_accepted (PNG/JPEG are not checked). null for an "
                          "ensemble: it accepts what every member accepts")
    codes: dict[str, CodeInfo] = Field(
        default_factory=dict,
        description="labels' codes in a standard scheme (model.toml [codes]), used as the "
                    "Structured Report's finding types; a label without one is coded in "
                    "the local scheme 99MEDEXPLAIN. For an ensemble, its members'")


# A model folder that failed to load; the others serve, requests naming it get 503.
class UnavailableModel(BaseModel):
    name: str
    state: Literal["UNAVAILABLE"] = "UNAVAILABLE"
    reason: str = Field(description="why it failed to load (model.toml, graph, compiler)")


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]
    unavailable: list[UnavailableModel] = Field(
        default_factory=list, description="models that failed to load, with the reason")


class Health(BaseModel):
    status: str


# RFC 9457 problem details, with a stable machine-readable code.
class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
