"""Pydantic models of medexplain's public HTTP API."""

from schemas.api import (
    AcceptsInfo,
    CodeInfo,
    DicomInfo,
    ExplainResponse,
    Explanation,
    Health,
    Heatmap,
    ImageInfo,
    ImagePreview,
    InputInfo,
    ModelInfo,
    ModelRef,
    ModelsResponse,
    Prediction,
    PredictResponse,
    Problem,
    Region,
    TargetLayerInfo,
    UnavailableModel,
)

__all__ = [
    "AcceptsInfo", "CodeInfo", "DicomInfo", "ExplainResponse", "Explanation", "Health", "Heatmap", "ImageInfo",
    "ImagePreview", "InputInfo", "ModelInfo", "ModelRef", "ModelsResponse", "PredictResponse",
    "Prediction", "Problem", "Region", "TargetLayerInfo", "UnavailableModel",
]
