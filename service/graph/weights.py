"""A model's weights held once, outside the graph protos the compiler passes around.

The compiler builds five graphs from one classifier (backbone, head, head VJP, guided,
all activations), each a ModelProto of its own. With the weights inside, every graph
carried a copy of them, every pass serialised them (shape inference, the checker, each
session's bytes), and every ONNX Runtime session held one more: VGG-16 (537 MB) took over
100 s and 9 GB to load. Here each large initializer's bytes are copied once into one
aligned buffer, and the protos keep only a reference: the tensor is marked as external
data whose ``location`` names this process's :class:`Weights` (a registry key), with
the offset and length of the bytes in the model file itself. Sessions get the shared
arrays through ``SessionOptions.add_initializer`` (ONNX Runtime then uses that memory and
reads nothing), the external reference pointing at the real model file so that it stays
a truthful one; :func:`embed` puts the bytes back for graphs written to disk.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

# Initializers of at least this many bytes are held outside the protos; smaller ones
# (shapes, scalars, biases of small layers) stay inline where every pass can read them.
MIN_BYTES: Final[int] = 4096
_TAG: Final[str] = "medexplain-weights:"
_ALIGN: Final[int] = 64  # cache line: SIMD kernels read weights aligned
_ANONYMOUS: Final[int] = (mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                          | getattr(mmap, "MAP_POPULATE", 0))  # Linux only

_registry: weakref.WeakValueDictionary[str, Weights] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()


@dataclass(eq=False)
class Weights:
    """The large initializers of one model, by name, as read-only arrays.

    Attributes:
        key: the registry key (the model file's SHA-256): what offloaded tensors name.
        folder: the model's folder, for ONNX Runtime's check that an external reference
            points at a real file.
        arrays: read-only views into one aligned buffer.
        sources: (file, offset, length) of each tensor's bytes: in the model file, or in
            the external data file the exporter wrote beside it.
    """

    key: str
    folder: Path
    arrays: dict[str, np.ndarray]
    sources: dict[str, tuple[str, int, int]]
    _values: dict[str, ort.OrtValue] = field(default_factory=dict, repr=False)

    def ort_value(self, name: str) -> ort.OrtValue:
        """One OrtValue per tensor, shared by every session of the model."""
        if name not in self._values:
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(self.arrays[name])
        return self._values[name]


def offload(raw: bytes, folder: Path, file: str,
            key: str | None = None) -> tuple[onnx.ModelProto, Weights]:
    """Parse a model file into a proto whose large initializers are references, and the
    :class:`Weights` they refer to (registered until nothing holds it).

    Initializers stored as external data (torch's dynamo exporter writes its weights to
    ``model.onnx.data`` beside the model by default) are read from those files. A model
    whose weights are already held (the same model loaded twice) gets those: its graphs
    and the first copy's name the same key, and both stay valid while either is loaded.

    Args:
        raw: the model file's bytes.
        folder, file: where the file is.
        key: the registry key; by default :func:`content_digest` of the model, which
            ``Weights.key`` then gives the caller (the compile cache's key too).

    Raises:
        ValueError: an external data reference outside ``folder`` or past its file's end,
            or weights held under ``key`` already, with other tensors.
        OSError: an external data file that cannot be read.
    """
    model = onnx.load_from_string(raw)
    spans = list(_initializer_spans(memoryview(raw)))
    chosen: list[tuple[onnx.TensorProto, tuple[str, int, int]]] = []
    for tensor, (name, span) in zip(model.graph.initializer, spans, strict=True):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            chosen.append((tensor, _external_source(tensor, folder)))
        elif span is not None and span[1] >= MIN_BYTES and tensor.name == name:
            chosen.append((tensor, (file, *span)))
    files: dict[str, np.ndarray] = {file: np.frombuffer(raw, dtype=np.uint8)}

    def mapped(source: str) -> np.ndarray:
        if source not in files:
            files[source] = np.memmap(folder / source, dtype=np.uint8, mode="r")
        return files[source]

    def source_bytes(tensor: onnx.TensorProto, source: str, offset: int,
                     length: int) -> np.ndarray:
        data = mapped(source)
        if offset + length > data.size:
            raise ValueError(f"initializer {tensor.name!r}: its data runs past the end of "
                             f"{source}")
        return data[offset:offset + length]

    if key is None:
        key = content_digest(raw, [mapped(name) for name in
                                   sorted({src for _, (src, _, _) in chosen} - {file})])
    with _registry_lock:
        weights = _registry.get(key)
    if weights is not None:
        if {tensor.name for tensor, _ in chosen} != set(weights.arrays):
            raise ValueError("the weights of this model are held already, with other tensors")
    else:
        weights = _copy(key, folder, chosen, source_bytes)
        with _registry_lock:
            # Another thread's load of the same file may have got there first: one copy.
            weights = _registry.setdefault(key, weights)
    files.clear()  # the memory maps of external data files
    for tensor, (_source, offset, length) in chosen:
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", _TAG + key), ("offset", str(offset)),
                     ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v
    # A parsed message keeps its cleared bytes in its arena until it is freed: a copy
    # holds only what is left.
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    return skeleton, weights


_SourceBytes = Callable[[onnx.TensorProto, str, int, int], np.ndarray]


def content_digest(raw: bytes, external: Sequence[np.ndarray | bytes] = ()) -> str:
    """The SHA-256 that names a model: of its file's bytes, and, for an export whose
    weights are in external data files, of those files' bytes too (in the order given:
    sorted by name). A dynamo export's model.onnx is the same file for every fine-tuning
    of an architecture; only its .data differs, so the file's hash alone named them all
    alike, and the second such model was refused at load. Without external data it is
    the model file's plain SHA-256."""
    if not external:
        return hashlib.sha256(raw).hexdigest()
    digest = hashlib.sha256(raw)
    for data in external:
        part = hashlib.sha256(data)
        digest.update(len(data).to_bytes(8, "little") + part.digest())
    return digest.hexdigest()


def _copy(key: str, folder: Path, chosen: list[tuple[onnx.TensorProto, tuple[str, int, int]]],
          source_bytes: _SourceBytes) -> Weights:
    """The chosen tensors' bytes copied into one aligned buffer."""
    total = sum(_aligned(length) for _, (_, _, length) in chosen)
    # An anonymous mapping of its own, not numpy's allocation: numpy asks the kernel for
    # transparent huge pages on large arrays (madvise), and faulting 0.5 GB of them in on
    # a machine whose memory is fragmented stalls on compaction (VGG-16: 2.4-3.5 s to fill
    # the buffer against 0.3-0.4 s here). Freed, the mapping goes straight back to the system.
    # Its pages are faulted in by the kernel when it is made (MAP_POPULATE: every byte is
    # written next anyway), not one write fault each: 512 MB filled in 0.18-0.19 s
    # against 0.35-0.36 s, 27 MB in 11-12 ms against 14-16 (BENCHMARKS.md, "Load memory").
    storage = (np.frombuffer(mmap.mmap(-1, total + _ALIGN, flags=_ANONYMOUS),
                             dtype=np.uint8) if total
               else np.empty(_ALIGN, dtype=np.uint8))
    start = -storage.ctypes.data % _ALIGN
    buffer = storage[start:start + total]
    arrays: dict[str, np.ndarray] = {}
    sources: dict[str, tuple[str, int, int]] = {}
    position = 0
    for tensor, (source, offset, length) in chosen:
        slot = buffer[position:position + length]
        slot[:] = source_bytes(tensor, source, offset, length)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = slot.view(dtype).reshape(tuple(tensor.dims))
        array.flags.writeable = False
        arrays[tensor.name] = array
        sources[tensor.name] = (source, offset, length)
        position += _aligned(length)
    return Weights(key, folder, arrays, sources)


def _external_source(tensor: onnx.TensorProto, folder: Path) -> tuple[str, int, int]:
    """(file, offset, length) of an exporter's external data reference, inside ``folder``."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    path = (folder / location).resolve()
    if not location or folder.resolve() not in path.parents:
        raise ValueError(f"initializer {tensor.name!r}: external data {location!r} is not a "
                         "file beside the model")
    offset = int(info.get("offset", 0))
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    default = int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return str(path.relative_to(folder.resolve())), offset, int(info.get("length", default))


def is_offloaded(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and _location(tensor).startswith(
        _TAG)


def owner(tensor: onnx.TensorProto) -> Weights:
    """The :class:`Weights` an offloaded tensor refers to.

    Raises:
        LookupError: when they are no longer held by anything.
    """
    key = _location(tensor)[len(_TAG):]
    with _registry_lock:
        weights = _registry.get(key)
    if weights is None:
        raise LookupError(f"the weights of initializer {tensor.name!r} are no longer loaded")
    return weights


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's value, offloaded or inline."""
    if is_offloaded(tensor):
        return owner(tensor).arrays[tensor.name]
    return numpy_helper.to_array(tensor)


def offloaded(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in model.graph.initializer:
        if is_offloaded(tensor):
            yield tensor


def for_session(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Weights | None, list[str]]:
    """A copy ONNX Runtime accepts, the weights to hand it with add_initializer, and the
    names of the initializers to hand it.

    The references are rewritten to the model file itself (a real file, at the real
    offsets), so ONNX Runtime's check of external data paths passes; the shared arrays
    given with add_initializer are what it then uses. The names come from here because
    the rewritten copy no longer says which tensors were offloaded: a name left out is
    one ONNX Runtime quietly maps from the file, a private copy per session.
    """
    names = [tensor.name for tensor in offloaded(model)]
    if not names:
        return model, None, []
    weights = owner(next(offloaded(model)))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in offloaded(copy):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = weights.sources[tensor.name][0]
    return copy, weights, names


def embed(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every offloaded tensor's bytes inline again (for writing to disk)."""
    if not any(True for _ in offloaded(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in list(offloaded(copy)):
        value = owner(tensor).arrays[tensor.name]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = value.tobytes()
    return copy


def _location(tensor: onnx.TensorProto) -> str:
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _aligned(length: int) -> int:
    return -(-length // _ALIGN) * _ALIGN


# --- where each initializer's raw_data lies in the file (protobuf wire format) ---------
# ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, .raw_data = 9.

def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of the length-delimited fields in a message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def _initializer_spans(buf: memoryview) -> Iterator[tuple[str, tuple[int, int] | None]]:
    """Each top-level initializer in file order: its name and its raw_data's span."""
    for number, start, end in _fields(buf, 0, len(buf)):
        if number != 7:
            continue
        for inner, t_start, t_end in _fields(buf, start, end):
            if inner != 5:
                continue
            name, span = "", None
            for tensor_field, v_start, v_end in _fields(buf, t_start, t_end):
                if tensor_field == 8:
                    name = bytes(buf[v_start:v_end]).decode("utf-8", "replace")
                elif tensor_field == 9:
                    span = (v_start, v_end - v_start)
            yield name, span


__all__ = ["MIN_BYTES", "Weights", "embed", "for_session", "is_offloaded", "offload",
           "offloaded", "owner", "to_array"]
