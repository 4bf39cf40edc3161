"""ONNX Runtime sessions: provider choice and options."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import threading
from functools import cache

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from threadpoolctl import threadpool_limits

from service.graph import weights

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


@cache
def _load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip's nvidia-* wheels hold, once.

    ``pip install 'medexplain[cuda]'`` brings them (onnxruntime-gpu's ``cuda`` and
    ``cudnn`` extras) into site-packages, where the dynamic loader does not look; ONNX
    Runtime's ``preload_dlls`` loads them from there, or by name from the system's library
    path (a CUDA image), so the CUDA provider finds them without LD_LIBRARY_PATH. It prints
    what it cannot load: that goes to the log, not to the server's stdout.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:  # onnxruntime < 1.21, or the CPU package
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except (OSError, RuntimeError) as exc:
        log.warning("loading the CUDA libraries: %s", exc)
    if printed.getvalue().strip():
        log.warning("loading the CUDA libraries: %s", " ".join(printed.getvalue().split()))


def requested_providers(preference: str) -> list[str]:
    """Providers to ask for: "cpu", "cuda" or "auto" (CUDA when a GPU driver is present)."""
    available = ort.get_available_providers()
    if preference == "cpu":
        return [CPU]
    if preference == "cuda" or (preference == "auto" and CUDA in available
                                and _cuda_driver_present()):
        if CUDA not in available:
            return [CPU]
        _load_cuda_libraries()
        return [CUDA, CPU]
    return [CPU]


_pool_lock = threading.Lock()
_pool_threads: int | None = None


def _ensure_thread_pool(threads: int) -> None:
    """Create ONNX Runtime's process-wide thread pool and CPU arena once, and leave the
    pool the cores.

    One request runs several sessions in turn (backbone, head, VJPs, ...). With a pool per
    session, the idle threads of the session that just ran spin for work on the very cores
    the next one needs: on 2 cores that made an interleaved forward pass ~1.5× slower. One
    shared pool has no such neighbours. Its size is fixed for the process's life, so the
    first caller's ``threads`` wins.

    NumPy's BLAS (OpenBLAS) is such a neighbour too: after each matrix product its threads
    spin for work for a while, and a forward pass started then ran 1.9× slower (DenseNet-121
    224 on 2 cores, 44 against 23.5 ms; BENCHMARKS.md, "NumPy's BLAS threads beside ONNX
    Runtime"). The products here
    are small (an RGB image's luma, CNN Fixations' blur), so BLAS gets one thread: the
    caller's.

    The arena: each session kept an arena of its own, grown to the peak of its graph and
    never handed back (handing it back after each run made guided backprop ~1.5× slower,
    engine.py), so a model that had run every method held the sum of its graphs' peaks
    (the guided graph's, the fixations graph's, the backbone's), and two models the sum of
    both. Sessions run one after another (one compute stream per device), so one arena
    registered with the environment and used by every session
    (``session.use_env_allocators``) holds the largest peak instead. With make_session's
    memory-pattern setting, after every method had run once, torchvision's VGG-16,
    ResNet-50 and DenseNet-121 added 1,722-1,745 → 1,467-1,472, 780-785 → 626 and 652 →
    368 MB, at the same speed (BENCHMARKS.md, "One CPU arena for every session"). Sessions
    on a GPU keep ONNX Runtime's own allocators (make_session).
    """
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            ort.set_global_thread_pool_sizes(max(threads, 0), 1)
            ort.create_and_register_allocator(
                ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                  ort.OrtMemType.DEFAULT), None)
            threadpool_limits(1, user_api="blas")
            _pool_threads = threads
        elif threads != _pool_threads:
            log.warning("ONNX Runtime's thread pool already has %d threads (0 = all cores); "
                        "ignoring a request for %d", _pool_threads, threads)


def provider_options(providers: list[str], conv_algo_search: str
                     ) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` with the CUDA provider's options.

    cuDNN picks each convolution's algorithm per input shape: EXHAUSTIVE benchmarks them
    all on the first run of a shape (hence the warm-up at load, see Engine.warm_up),
    HEURISTIC asks cuDNN's heuristics (quicker start, sometimes slower kernels). Copies in
    the default stream keep the I/O-bound inputs ordered with the compute that reads them.
    """
    options: dict[str, str] = {"cudnn_conv_algo_search": conv_algo_search,
                               "do_copy_in_default_stream": "1"}
    return [(p, options) if p == CUDA else p for p in providers]


def make_session(model: onnx.ModelProto | bytes | str, providers: list[str],
                 threads: int, *, prepack: bool = True,
                 conv_algo_search: str = "EXHAUSTIVE") -> ort.InferenceSession:
    """A session on the shared thread pool; ``model`` as a proto, bytes or a file path.

    A proto whose weights are held outside it (service.graph.weights) gets them as
    shared initializers: every session of a model uses the same memory. ``prepack=False``
    keeps ONNX Runtime from repacking the weights of MatMul/Gemm/Conv for its kernels, a
    private copy per session: worth it for the graph that runs on every request, not for
    the ones a few methods use.
    """
    _ensure_thread_pool(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.use_per_session_threads = False
    if CUDA not in providers:
        # The process's one CPU arena (_ensure_thread_pool). A CUDA session keeps ONNX
        # Runtime's defaults: not measured on a GPU, and environment allocators have known
        # faults beside the CUDA provider's pinned memory (onnxruntime issue 25211).
        options.add_session_config_entry("session.use_env_allocators", "1")
        # With its memory pattern ONNX Runtime serves a graph's first run tensor by tensor
        # and every later run from one block planned from it: a second allocation of the
        # graph's peak beside the first run's, which the arena keeps (DenseNet-121's guided
        # graph: +113 MB at its second run). Without it each run reuses the freed tensors,
        # as fast (BENCHMARKS.md, "One CPU arena for every session").
        options.enable_mem_pattern = False
    # Severity 3 = errors only: the generated graphs trigger harmless shape-merge warnings.
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    shared = None
    if isinstance(model, onnx.ModelProto):
        model, shared, names = weights.for_session(model)
        if shared is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(shared.folder))
            for name in names:
                options.add_initializer(name, shared.ort_value(name))
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    session = ort.InferenceSession(source, sess_options=options,
                                   providers=provider_options(providers, conv_algo_search))
    if isinstance(source, bytes):
        # The Python wrapper keeps the serialised graph for the session's life, only to
        # rebuild the session after a provider failure (its own comment: "This is bad as
        # we're holding the memory indefinitely"): for the guided graph, whose flipped
        # kernels are inline, that was 67 MB on ResNet-50. Without it a failing run
        # raises like any other ONNX Runtime error instead of rebuilding.
        session.disable_fallback()
        session._model_bytes = None
    # The session reads the shared arrays for as long as it lives.
    session.shared_weights = shared  # type: ignore[attr-defined]
    return session
