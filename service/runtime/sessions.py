"""ONNX Runtime sessions: provider choice and options."""

from __future__ import annotations

import ctypes
import logging

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

log = logging.getLogger(__name__)

# ONNX Runtime's own exception types (they derive straight from Exception).
ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.InvalidGraph,
    _ort_state.InvalidProtobuf, _ort_state.NotImplemented, _ort_state.RuntimeException,
    _ort_state.EPFail,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists CUDA as "available" even on machines without a GPU; trying it
    # there prints a screen of library-load errors. The driver library is the cheap tell.
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def requested_providers(preference: str) -> list[str]:
    """Providers to ask for: "cpu", "cuda" or "auto" (CUDA when a GPU driver is present)."""
    available = ort.get_available_providers()
    if preference == "cpu":
        return [CPU]
    if preference == "cuda" or (preference == "auto" and CUDA in available
                                and _cuda_driver_present()):
        return [CUDA, CPU] if CUDA in available else [CPU]
    return [CPU]


def make_session(model: onnx.ModelProto, providers: list[str], threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Severity 3 = errors only: the generated graphs trigger harmless shape-merge warnings.
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=providers)
