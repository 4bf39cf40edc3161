"""medexplain: explanations for ONNX CNN classifiers of medical images."""

__version__ = "0.1.0"
