"""Pydantic models of medexplain's public HTTP API."""

from schemas.api import (
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
)

__all__ = [
    "DicomInfo", "ExplainResponse", "Explanation", "Health", "Heatmap", "ImageInfo", "ImagePreview",
    "InputInfo", "ModelInfo", "ModelRef", "ModelsResponse", "PredictResponse", "Prediction", "Problem",
    "Region", "TargetLayerInfo",
]
